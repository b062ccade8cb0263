"""The checkpoints people have (issue 23's table), read by ``--model`` with no flags: each one saved the
way users save it, loaded through batchcam, and compared with a plain PyTorch forward pass on the
same images (PIL + torchvision.transforms, within 1e-4) and with pytorch-grad-cam on the same layer."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from batchcam.errors import CheckpointError
from batchcam.model.checkpoint import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, load_model
from tests.unit.model.user_models import (
    Preprocessing,
    assert_equals_reference,
    batchcam_inputs,
    engine_result,
    optimizer_state,
    untrained_weights,
    user_model,
    write_xray_pngs,
)

# A plain state dict records no preprocessing: batchcam assumes the Kaggle recipe's, 224 px squash.
PLAIN = Preprocessing(size=DEFAULT_IMAGE_SIZE)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Small models on a small shared CPU are faster with one intra-op thread."""


@pytest.fixture(scope="module")
def xrays(tmp_path_factory):
    return write_xray_pngs(tmp_path_factory.mktemp("xrays"), count=3)


def test_a_plain_state_dict_with_a_linear_head_loads_exactly_with_its_assumptions_listed(tmp_path, xrays):
    user = user_model("resnet18", pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")

    loaded = load_checkpoint(tmp_path / "model.pth")

    assert loaded.source == "a plain state dict"
    assert loaded.spec.class_names == ("NORMAL", "PNEUMONIA")
    assert (loaded.spec.image_size, loaded.spec.resize, loaded.spec.channels) == (224, "squash", 3)
    assert loaded.spec.mean == IMAGENET_MEAN and loaded.spec.std == IMAGENET_STD
    assert loaded.target_layer == "layer4"
    assert loaded.description() == "weights of a resnet18, 2 outputs; fc = Linear(512, 2)"
    assert any("224 px squash, ImageNet mean/std, 3 channels" in a for a in loaded.assumptions)
    assert any("NORMAL, PNEUMONIA" in a for a in loaded.assumptions)
    notice = loaded.assumption_notice()
    assert notice.startswith("model.pth is a plain state dict") and "\n" not in notice
    assert "import-model" in notice
    said = []
    assert load_model(tmp_path / "model.pth", said.append).network == loaded.network
    assert said == [notice]
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True)


@pytest.mark.parametrize("prefix", ["module.", "module.model."], ids=["dataparallel", "dataparallel-of-a-wrapper"])
def test_a_state_dict_with_a_dropout_head_and_a_shared_prefix_loads_exactly(tmp_path, xrays, prefix):
    user = user_model("resnet18", nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 2)), pre=PLAIN, split_on=xrays)
    torch.save({prefix + k: v for k, v in user.state_dict().items()}, tmp_path / "model.pth")

    loaded = load_checkpoint(tmp_path / "model.pth")

    assert loaded.network.head_description == "fc = Sequential(Dropout, Linear(512, 2))"
    assert not any("head" in a for a in loaded.assumptions)  # Dropout or not, the same on ReLU'd features
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True, every_class=False)


def test_an_mlp_head_loads_and_is_explained_through_pytorch_grad_cam(tmp_path, xrays):
    head = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 2))
    user = user_model("resnet18", head, pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "mlp.pth")

    loaded = load_checkpoint(tmp_path / "mlp.pth")

    assert loaded.network.head_description == "fc = Sequential(Linear(512, 256), ReLU, Dropout, Linear(256, 2))"
    assert any("key positions" in a for a in loaded.assumptions)
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=False)


def test_a_training_dict_with_optimizer_state_and_class_names_loads_with_its_names(tmp_path, xrays):
    user = user_model("resnet18", pre=PLAIN, split_on=xrays)
    torch.save({"epoch": 7, "model_state_dict": user.state_dict(), "optimizer_state_dict": optimizer_state(user),
                "loss": 0.31, "class_names": ["NORMAL", "PNEUMONIA"]}, tmp_path / "checkpoint.pth")

    loaded = load_checkpoint(tmp_path / "checkpoint.pth")

    assert loaded.source == "a training checkpoint (weights under 'model_state_dict')"
    assert not any("class names" in a for a in loaded.assumptions)
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True, every_class=False)


def test_a_lightning_checkpoint_loads_its_model_prefixed_state_dict(tmp_path, xrays):
    """As Lightning writes it: the LightningModule's ``self.model`` gives every key a ``model.`` prefix."""
    user = user_model("resnet18", pre=PLAIN, split_on=xrays)
    checkpoint = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in user.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 120},
                               "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.2871),
            "best_model_path": "/content/lightning_logs/version_0/checkpoints/epoch=3-step=120.ckpt"}},
        "optimizer_states": [optimizer_state(user)], "lr_schedulers": [],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 1e-4, "num_classes": 2},
    }
    torch.save(checkpoint, tmp_path / "epoch=3-step=120.ckpt")

    loaded = load_checkpoint(tmp_path / "epoch=3-step=120.ckpt")

    assert loaded.source == "a Lightning checkpoint (weights under 'state_dict')"
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True, every_class=False)


def test_a_timm_training_checkpoint_with_its_arguments_loads(tmp_path, xrays):
    """timm's train.py saves {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'metric'}, args an
    argparse.Namespace; timm's plain resnets have torchvision's key names."""
    user = user_model("resnet18", pre=PLAIN, split_on=xrays)
    args = argparse.Namespace(model="resnet18", num_classes=2, lr=0.01, img_size=224, mean=None, std=None,
                              aug_splits=0, smoothing=0.1, epochs=5)
    torch.save({"epoch": 4, "arch": "resnet18", "state_dict": user.state_dict(), "optimizer": optimizer_state(user),
                "version": 2, "args": args, "metric": 0.91}, tmp_path / "model_best.pth.tar")

    loaded = load_checkpoint(tmp_path / "model_best.pth.tar")

    assert loaded.network.arch == "resnet18"
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True, every_class=False)


def test_a_single_logit_is_two_probabilities_summing_to_one_and_both_classes_have_a_map(tmp_path, xrays):
    user = user_model("resnet18", nn.Linear(512, 1), pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "bce.pth")

    loaded = load_checkpoint(tmp_path / "bce.pth")

    assert loaded.network.single_logit and loaded.spec.class_names == ("NORMAL", "PNEUMONIA")
    assert any("sigmoid" in a for a in loaded.assumptions)
    x = batchcam_inputs(xrays, loaded.spec)
    probabilities, targets, _, _ = engine_result(loaded, x)
    assert torch.allclose(probabilities.sum(1), torch.ones(len(xrays)), atol=1e-6)
    assert set(targets.tolist()) == {0, 1}  # both classes predicted on these images
    for target in (0, 1):  # explaining NORMAL explains -z: a map, not zeros
        _, _, maps, _ = engine_result(loaded, x, target)
        assert maps.reshape(len(xrays), -1).max(1).min() > 0, target
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True)


def test_three_classes_load_with_the_names_the_file_holds(tmp_path, xrays):
    user = user_model("resnet18", outputs=3, pre=PLAIN, split_on=xrays)
    torch.save({"model_state_dict": user.state_dict(), "class_to_idx": {"BACTERIA": 1, "NORMAL": 0, "VIRUS": 2}},
               tmp_path / "three.pth")

    loaded = load_checkpoint(tmp_path / "three.pth")

    assert loaded.spec.class_names == ("NORMAL", "BACTERIA", "VIRUS")
    assert_equals_reference(loaded, user, xrays, PLAIN, exact=True)


@pytest.mark.parametrize("names", [
    {"idx_to_class": {0: "NORMAL", 1: "BACTERIA", 2: "VIRUS"}},
    {"idx_to_class": {"0": "NORMAL", "1": "BACTERIA", "2": "VIRUS"}},
    {"classes": ["NORMAL", "BACTERIA", "VIRUS"]},
    {"hyper_parameters": {"class_names": ["NORMAL", "BACTERIA", "VIRUS"]}},
], ids=["idx_to_class-int-keys", "idx_to_class-str-keys", "classes", "lightning-hyper_parameters"])
def test_class_names_are_read_from_every_usual_key(tmp_path, names):
    torch.save({"state_dict": untrained_weights(outputs=3), **names}, tmp_path / "three.pth")
    assert load_checkpoint(tmp_path / "three.pth").spec.class_names == ("NORMAL", "BACTERIA", "VIRUS")


def test_more_outputs_without_names_are_refused_pointing_at_import_model_classes(tmp_path):
    torch.save(untrained_weights(outputs=3), tmp_path / "three.pth")

    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(tmp_path / "three.pth")

    message = str(refusal.value)
    assert message == (f"{tmp_path / 'three.pth'}: weights of a resnet18, 3 outputs: a head with 3 outputs and no "
                       f"class names: batchcam import-model {tmp_path / 'three.pth'} --out MODEL.pt --classes A,B,C")


def test_class_names_that_do_not_fit_the_head_are_refused(tmp_path):
    torch.save({"model_state_dict": untrained_weights(outputs=3),
                "class_names": ["NORMAL", "PNEUMONIA"]}, tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match=r"2 class names \(NORMAL, PNEUMONIA\) for weights of a resnet18, "
                                              r"3 outputs"):
        load_checkpoint(tmp_path / "three.pth")


def test_a_one_channel_state_dict_is_refused_asking_for_its_normalisation(tmp_path):
    """Its preprocessing cannot be guessed (the reference gave 3 of 4 NORMAL where a guess gave all PNEUMONIA)."""
    torch.save(untrained_weights(channels=1), tmp_path / "gray.pth")
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(tmp_path / "gray.pth")
    assert str(refusal.value).endswith("weights of a resnet18, 1 input channel, 2 outputs; a 1-channel model's "
                                       "normalisation is not in the file: batchcam import-model "
                                       f"{tmp_path / 'gray.pth'} --out MODEL.pt --channels 1 --mean M --std S")


def test_a_head_with_an_ambiguous_gap_is_refused_naming_the_way_out(tmp_path):
    head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(), nn.Dropout(), nn.Linear(64, 2))
    torch.save(untrained_weights(head), tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match="3 layers without weights between fc.0 and fc.4: which ones is "
                                              "ambiguous; import the whole model"):
        load_checkpoint(tmp_path / "gap.pth")


def test_a_head_with_batchnorm_is_refused_saying_what_batchcam_runs(tmp_path):
    head = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    torch.save(untrained_weights(head), tmp_path / "bn.pth")
    with pytest.raises(CheckpointError, match=r"fc\.1 is a BatchNorm1d layer; batchcam runs heads of Linear, ReLU "
                                              "and Dropout layers"):
        load_checkpoint(tmp_path / "bn.pth")
