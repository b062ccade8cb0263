"""Models as users build and save them, and the plain PyTorch reference batchcam must equal.

The reference is what a user's own notebook does: ``PIL.Image.open(f).convert("RGB" or "L")`` ->
``transforms.Resize``/``CenterCrop`` -> ``ToTensor`` -> ``Normalize`` -> the torchvision model ->
softmax (sigmoid for a single logit); and pytorch-grad-cam's ``GradCAM`` on the same target layer.
batchcam's side is its own decoder and model view, ``model_input``, the loaded model and ``CamExplainer``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision import models, transforms

from batchcam.cam.explainer import CamExplainer
from batchcam.cam.overlay import min_max_scaled, upsample
from batchcam.decode.imaging import decode_grayscale, model_view
from batchcam.model.checkpoint import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec, model_input
from batchcam.resources import DEMO_MODEL
from batchcam.synthetic import generate

SIZE = 64            # the input size of these tests' models (the checkpoint or the import declares it)
IMAGE_SIZES = [(150, 120), (120, 160), (96, 96), (200, 130), (130, 170), (110, 90)]   # (width, height)
PROBABILITY_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-4          # the exact path against pytorch-grad-cam, normalised maps
MIN_CORRELATION = 0.98        # the library path against pytorch-grad-cam


@dataclass(frozen=True)
class Preprocessing:
    size: int = SIZE
    resize: str = "squash"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    def spec(self, class_names=("NORMAL", "PNEUMONIA"), arch="resnet18") -> ModelSpec:
        return ModelSpec(class_names=tuple(class_names), image_size=self.size, mean=self.mean, std=self.std,
                         arch=arch, channels=self.channels, resize=self.resize)


def write_xray_pngs(folder: Path, count: int = 6) -> list[Path]:
    """Synthetic X-rays of both classes, of several sizes and aspect ratios, saved as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"xray{i}.png"
        generate(100 + i, ("NORMAL", "PNEUMONIA")[i % 2], IMAGE_SIZES[i % len(IMAGE_SIZES)]).image.save(path)
        paths.append(path)
    return paths


def reference_inputs(paths: list[Path], pre: Preprocessing) -> torch.Tensor:
    """PIL + torchvision.transforms, as a user's notebook preprocesses."""
    if pre.resize == "squash":
        resize = [transforms.Resize((pre.size, pre.size))]
    else:
        resize = [transforms.Resize(round(pre.size / 0.875)), transforms.CenterCrop(pre.size)]
    transform = transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    mode = "RGB" if pre.channels == 3 else "L"
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(transform(image.convert(mode)))
    return torch.stack(images)


def batchcam_inputs(paths: list[Path], spec: ModelSpec) -> torch.Tensor:
    """batchcam's decoder, model view and normalisation."""
    views = [model_view(decode_grayscale(path.read_bytes()).gray, spec.image_size, spec.resize) for path in paths]
    return model_input(torch.from_numpy(np.stack(views)), spec)


def reference_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax of the user's model, or (1 - sigmoid, sigmoid) of its single logit."""
    with torch.inference_mode():
        out = model.eval()(x).float()
    if out.shape[1] == 1:
        positive = torch.sigmoid(out[:, 0])
        return torch.stack([1 - positive, positive], dim=1)
    return torch.softmax(out, dim=1)


def seeded(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give a randomly initialised model BatchNorm statistics of real-looking images (one pass in
    training mode), so its activations have sensible scales and its outputs vary between images."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(images)
    return model.eval()


def split_predictions(model: nn.Module, head: nn.Module, x: torch.Tensor) -> nn.Module:
    """Shift the last Linear's bias so the images are predicted as more than one class."""
    linear = head if isinstance(head, nn.Linear) else [m for m in head if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        logits = model.eval()(x)
        linear.bias -= logits.median(dim=0).values
    return model


def demo_backbone() -> dict[str, torch.Tensor]:
    """The demo checkpoint's trained ResNet18 weights without its head (trained activations)."""
    raw = torch.load(DEMO_MODEL, weights_only=True)
    return {k: v.float() for k, v in raw["state_dict"].items() if not k.startswith("fc.")}


def probe_images(pre: Preprocessing, count: int = 8) -> torch.Tensor:
    """In-memory synthetic X-rays through the plain reference preprocessing (for seeding BatchNorm)."""
    mode = "RGB" if pre.channels == 3 else "L"
    transform = transforms.Compose([transforms.Resize((pre.size, pre.size)), transforms.ToTensor(),
                                    transforms.Normalize(pre.mean, pre.std)])
    return torch.stack([transform(generate(200 + i, ("NORMAL", "PNEUMONIA")[i % 2], (120, 100)).image.convert(mode))
                        for i in range(count)])


def user_model(arch: str, head: nn.Module | None = None, outputs: int = 2, channels: int = 3, seed: int = 0,
               pre: Preprocessing | None = None, split_on: list[Path] | None = None) -> nn.Module:
    """A torchvision model with its last layer replaced the way tutorials do it, seeded; its predictions
    split between classes on the images ``split_on`` (else on a few in-memory X-rays)."""
    torch.manual_seed(seed)
    model = getattr(models, arch)()
    attribute = "fc" if arch.startswith("resnet") else "classifier"
    if channels == 1:  # the grayscale recipe: a ResNet's first convolution taking one channel
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    if head is None:
        head = nn.Linear(_width(model, attribute), outputs)
    if arch.startswith("efficientnet") and isinstance(head, nn.Linear):
        model.classifier[1] = head   # the tutorials' way: keep EfficientNet's Dropout
    else:
        setattr(model, attribute, head)
    pre = pre or Preprocessing(channels=channels)
    if arch == "resnet18" and channels == 3:
        model.load_state_dict(demo_backbone(), strict=False)
        model.eval()
    else:
        seeded(model, probe_images(pre))
    return split_predictions(model, head, reference_inputs(split_on, pre) if split_on else probe_images(pre))


def untrained_weights(head: nn.Module | None = None, outputs: int = 2, channels: int = 3) -> dict[str, torch.Tensor]:
    """A seeded, untrained ResNet18's state dict with the given head: enough where only a refusal is checked."""
    torch.manual_seed(0)
    model = models.resnet18()
    if channels == 1:
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model.fc = head or nn.Linear(512, outputs)
    return model.state_dict()


def _width(model: nn.Module, attribute: str) -> int:
    head = getattr(model, attribute)
    return (head if isinstance(head, nn.Linear) else [m for m in head if isinstance(m, nn.Linear)][-1]).in_features


def engine_result(loaded: LoadedModel, x: torch.Tensor, target: int | None = None):
    """(probabilities, targets, normalised upsampled maps, exact) through batchcam's CamExplainer."""
    with CamExplainer(loaded.model, target=target, target_layer=loaded.target_layer) as engine:
        batch = engine(x)
        exact = engine.exact
    maps = np.stack([min_max_scaled(upsample(min_max_scaled(c), x.shape[-2], x.shape[-1])).numpy() for c in batch.cams])
    return batch.probabilities, batch.targets, maps, exact


class Negated:
    """The score of the first class of a single-logit model: -z (what explaining NORMAL explains)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return -output[..., 0] if output.ndim == 1 else -output[:, 0]


def library_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int],
                 single_logit: bool = False) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of the user's model for each image's target class."""
    if single_logit:
        wanted = [ClassifierOutputTarget(0) if t == 1 else Negated() for t in targets]
    else:
        wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    with GradCAM(model=model.eval(), target_layers=[layer]) as cam:
        return cam(input_tensor=x.clone(), targets=wanted)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def assert_equals_reference(loaded: LoadedModel, user: nn.Module, paths: list[Path], pre: Preprocessing, *,
                            exact: bool, cam_reference: tuple[nn.Module, nn.Module] | None = None,
                            every_class: bool = True) -> None:
    """batchcam's probabilities equal the plain PyTorch reference's (1e-4), and its maps pytorch-grad-cam's
    on ``cam_reference`` (a model computing the user's and its target layer; default: the user's ResNet's
    layer4). The maps are compared for the predicted class and, with ``every_class``, for every class as a
    fixed target.
    """
    cam_model, cam_layer = cam_reference or (user, user.layer4)
    expected = reference_probabilities(user, reference_inputs(paths, pre))
    x = batchcam_inputs(paths, loaded.spec)
    probabilities, targets, maps, used_exact = engine_result(loaded, x)
    assert used_exact is exact
    assert probabilities.shape == expected.shape
    assert (probabilities - expected).abs().max() <= PROBABILITY_TOLERANCE
    single = loaded.network.single_logit
    for target in [None, *(range(expected.shape[1]) if every_class else ())]:
        if target is not None:
            _, targets, maps, _ = engine_result(loaded, x, target)
        reference = library_maps(cam_model, cam_layer, reference_inputs(paths, pre), targets.tolist(), single)
        assert maps.shape == reference.shape
        if exact:
            assert np.abs(maps - reference).max() <= MAP_TOLERANCE, target
        for ours, theirs in zip(maps, reference):
            assert correlation(ours, theirs) >= MIN_CORRELATION, target


def cam_reference(user: nn.Module, arch: str) -> tuple[nn.Module, nn.Module]:
    """The user's own torchvision model and its documented target layer, for pytorch-grad-cam (DenseNet: a
    model computing the same with its last ReLU as a module, ``features.relu5``'s counterpart)."""
    if arch.startswith("resnet"):
        return user, user.layer4
    if arch.startswith("efficientnet"):
        return user, user.features[-1]
    reference = DenseNetWithReluModule(user)
    return reference, reference.relu


class DenseNetWithReluModule(nn.Module):
    """torchvision's DenseNet.forward written out with its last ReLU as a module pytorch-grad-cam can hook
    (torchvision applies it as a function, in place)."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features, self.relu, self.classifier = densenet.features, nn.ReLU(), densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def optimizer_state(model: nn.Module) -> dict:
    """An Adam state after one step, of a copy (the saved weights stay the user model's): what a training
    checkpoint holds beside the model's."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()
