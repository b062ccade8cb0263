"""Train the NORMAL/PNEUMONIA ResNet18 that ``batchcam scan`` loads.

The recipe of the original study: ImageFolder data with train/val/test splits, images resized to
224 and normalised with ImageNet statistics, horizontal flips and small rotations, CrossEntropyLoss,
Adam at lr 1e-4, 20 epochs of batch 32, with and without dropout compared. The best epoch by
validation loss is kept and written as a batchcam checkpoint (see batchcam/model/checkpoint.py),
the very format ``scan`` reads, through the same ``build_model`` and ``save_checkpoint``. At the end
the best model is calibrated (batchcam/model/calibration.py): the training images' feature
statistics for the out-of-distribution flag, and the temperature fitted on the validation split;
the test metrics are then those of the calibrated probabilities, with ECE before and after.

    python train_model.py --data DIR --out runs/exp1
    python train_model.py --data DIR --out runs/cmp --compare-dropout 0.5
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from batchcam.cam.explainer import CamExplainer
from batchcam.checks.metrics import classification_metrics, expected_calibration_error
from batchcam.cli import add_positive_option, add_selection_options, selection
from batchcam.config import DEFAULT_MAX_FILE_BYTES, Selection, resolve_positive
from batchcam.decode.discover import IMAGE_EXTENSIONS, discover
from batchcam.decode.imaging import DECODE_MIN_LONG_SIDE, decode_grayscale, model_view
from batchcam.decode.pixels import DecodeError, NotSelected
from batchcam.errors import CheckpointError, UsageError
from batchcam.model.architectures import ARCHITECTURES, replace_module
from batchcam.model.calibration import Calibration, fit_calibration, scaled_probabilities
from batchcam.model.checkpoint import ModelSpec, build_model, load_model, model_input, save_checkpoint
from batchcam.runtime.bounded import FileTooLarge, read_file_bounded
from batchcam.runtime.devices import resolve_device, resolve_precision

SKIPPED = "not selected: "  # marks a film left out by the selection rule among the skipped files
MIN_VAL_IMAGES = 50  # the Kaggle val/ folder has 16 images: too few to pick an epoch by


Item = tuple[Path, int]                    # an image file and its class index
Splits = dict[str, list[Item]]             # "train", "val", "test" -> their items
Loaded = tuple[torch.Tensor, int, str, str]  # one item read: (image, class index, path, why it was skipped or "")
# One batch: images and labels (both None when every file of it was skipped), and (path, why) of those skipped.
Batch = tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]
Progress = Callable[[DataLoader, str], Iterable[Batch]]


class TrainingError(Exception):
    """A problem with the data or the options, reported as one line without a traceback."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the NORMAL/PNEUMONIA ResNet18 that ``batchcam scan`` loads.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/, val/, test/")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    p.add_argument("--epochs", type=int, default=20, help="number of epochs")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the final linear layer")
    p.add_argument("--compare-dropout", type=float, metavar="P", default=None,
                   help="train twice, without dropout and with dropout P, and write a comparison table")
    p.add_argument("--pretrained", default="imagenet",
                   help="initial weights: imagenet (torchvision's, needs them downloaded or cached), "
                        "none (random), or a model file batchcam scan --model reads (a batchcam checkpoint, "
                        "or a resnet18/34/50/101, densenet121 or efficientnet_b0 state dict, plain or in a "
                        "training checkpoint): its backbone and preprocessing, with a new head for the classes")
    p.add_argument("--val-split", type=float, default=0.1,
                   help=f"fraction of train/ carved out for validation when val/ is missing or has "
                        f"fewer than {MIN_VAL_IMAGES} images")
    p.add_argument("--image-size", type=int, default=224, help="square input size of the model")
    p.add_argument("--rotation", type=float, default=10.0, help="random rotation range, in degrees (+/-)")
    p.add_argument("--class-weights", action="store_true",
                   help="weight the loss by inverse class frequency (for imbalanced data)")
    p.add_argument("--select-by", choices=("loss", "auc"), default="loss",
                   help="which validation number picks the best epoch (lowest loss or highest ROC AUC)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt of an interrupted run")
    add_selection_options(p)
    add_positive_option(p)
    p.add_argument("--half-weights", action="store_true",
                   help="store the final checkpoint's weights as float16 (half the size)")
    return p


# ---------------------------------------------------------------- data

def list_split(folder: Path, class_names: list[str]) -> list[Item]:
    items: list[Item] = []
    for index, name in enumerate(class_names):
        class_dir = folder / name
        files = [candidate.path for candidate in discover(class_dir).candidates]  # exactly what scan reads
        if not files:
            raise TrainingError(f"{class_dir}: no images (expected {', '.join(sorted(IMAGE_EXTENSIONS))} files, "
                                "or DICOM files without an extension)")
        items.extend((p, index) for p in files)
    return items


def discover_splits(data: Path, val_split: float, seed: int) -> tuple[list[str], Splits]:
    train_dir = data / "train"
    if not train_dir.is_dir():
        raise TrainingError(f"{data}: no train/ folder (expected train/, val/ and test/, each with one "
                            "folder per class)")
    class_names = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_names) < 2:
        raise TrainingError(f"{train_dir}: needs at least two class folders, found {class_names}")
    splits = {"train": list_split(train_dir, class_names)}
    for split in ("val", "test"):
        folder = data / split
        if folder.is_dir():
            extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            if extra != class_names:
                raise TrainingError(f"{folder}: class folders {extra} differ from train/'s {class_names}")
            splits[split] = list_split(folder, class_names)
    if "test" not in splits:
        raise TrainingError(f"{data}: no test/ folder; the final metrics need held-out images")
    if len(splits.get("val", [])) < MIN_VAL_IMAGES:
        if not 0 < val_split < 1:
            raise TrainingError(f"--val-split must be between 0 and 1, got {val_split}")
        splits["train"], carved = carve_validation(splits["train"], val_split, seed)
        splits["val"] = splits.get("val", []) + carved
    return class_names, splits


def carve_validation(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Move a stratified random fraction of the training images into validation."""
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({label for _, label in items}):
        group = [item for item in items if item[1] == label]
        rng.shuffle(group)
        cut = max(1, round(len(group) * fraction))
        val.extend(group[:cut])
        train.extend(group[cut:])
    return sorted(train), sorted(val)


class XrayFolder(Dataset):
    """(path, label) pairs decoded as the scanner decodes them; augmentation only when training.

    A file that cannot be decoded yields ``ok=False`` instead of raising, so one bad image is a
    counted skip rather than the end of a long run. DICOM films are chosen by scan's own rule
    (``selection``: by default frontal chest radiographs), so a model never learns from what scan
    would not score.
    """

    def __init__(self, items: list[Item], image_size: int, augment: bool, rotation: float,
                 selection: Selection = Selection(), resize: str = "squash"):
        self.items, self.image_size, self.augment, self.rotation = items, image_size, augment, rotation
        self.selection, self.resize = selection, resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        path, label = self.items[index]
        try:
            data = read_file_bounded(path, DEFAULT_MAX_FILE_BYTES)
            gray = decode_grayscale(data, min_long_side=DECODE_MIN_LONG_SIDE, name=path.name,
                                    selection=self.selection).gray
        except NotSelected as e:
            return torch.zeros(self.image_size, self.image_size, dtype=torch.uint8), label, str(path), f"{SKIPPED}{e}"
        except (DecodeError, FileTooLarge, OSError) as e:
            return torch.zeros(self.image_size, self.image_size, dtype=torch.uint8), label, str(path), str(e)
        square = Image.fromarray(model_view(gray, self.image_size, self.resize))
        if self.augment:
            if random.random() < 0.5:
                square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.rotation:
                square = square.rotate(random.uniform(-self.rotation, self.rotation), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(square, dtype=np.uint8)), label, str(path), ""


def collate(batch: list[Loaded]) -> Batch:
    good = [b for b in batch if not b[3]]
    bad = [(b[2], b[3]) for b in batch if b[3]]
    if not good:
        return None, None, bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), bad


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(items: list[Item], args: argparse.Namespace, augment: bool, shuffle: bool,
                resize: str = "squash") -> DataLoader:
    """Workers are not persistent: each epoch reseeds the generator (see ``reseed``), so the
    shuffle and augmentation of epoch N are the same whether or not the run was resumed."""
    dataset = XrayFolder(items, args.image_size, augment, args.rotation, args.selection, resize)
    return DataLoader(dataset, batch_size=args.batch_size,
                      shuffle=shuffle, num_workers=args.workers, collate_fn=collate,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(args.seed))


def reseed(loader: DataLoader, seed: int, epoch: int) -> None:
    loader.generator.manual_seed(seed * 10_007 + epoch)
    random.seed(seed * 10_007 + epoch)


# ---------------------------------------------------------------- model

def initial_model(args: argparse.Namespace, class_names: list[str], dropout: float) -> tuple[nn.Module, ModelSpec]:
    """The model to train and the preprocessing it is trained with: ResNet18 from ImageNet or at random
    with batchcam's defaults, or the model in ``--pretrained FILE`` with its own (``pretrained_model``)."""
    spec = ModelSpec(class_names=tuple(class_names), image_size=args.image_size, dropout=dropout)
    if args.pretrained not in ("none", "imagenet"):
        return pretrained_model(Path(args.pretrained), class_names, args.image_size, dropout)
    return resnet18_model(args, len(class_names), dropout), spec


def pretrained_model(path: Path, class_names: list[str], image_size: int,
                     dropout: float) -> tuple[nn.Module, ModelSpec]:
    """The model in ``path`` read through batchcam's library, as ``scan --model`` reads it (what it assumes
    is said on stderr), its head replaced by a Linear for ``class_names`` (after Dropout when asked); its
    architecture, channels, resize and mean/std kept, its input size ``--image-size``."""
    if not path.is_file():
        raise TrainingError(f"--pretrained {path}: not imagenet, none, or an existing file")
    try:
        loaded = load_model(path, lambda notice: print(f"train_model.py: warning: {notice}", file=sys.stderr),
                            names_needed=False)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    model, head_name = loaded.model, ARCHITECTURES[loaded.spec.arch].head
    width = next(m for m in model.get_submodule(head_name).modules() if isinstance(m, nn.Linear)).in_features
    head = nn.Linear(width, len(class_names))
    replace_module(model, head_name, nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head)
    spec = replace(loaded.spec, class_names=tuple(class_names), image_size=image_size, dropout=dropout)
    return model.train(), spec


def resnet18_model(args: argparse.Namespace, num_classes: int, dropout: float) -> nn.Module:
    """``--pretrained none``: at random; ``imagenet``: torchvision's ImageNet weights, fetched or cached."""
    if args.pretrained == "none":
        return build_model(num_classes, dropout)
    from torchvision.models import ResNet18_Weights
    try:
        imagenet = build_model(1000, 0.0, weights=ResNet18_Weights.IMAGENET1K_V1).state_dict()
    except Exception as e:  # urllib, SSL, socket and hub errors all mean "could not fetch"
        raise TrainingError(
            f"ImageNet weights for ResNet18 could not be loaded ({type(e).__name__}: {str(e)[:120]}). "
            "Offline, either train from scratch with --pretrained none, or copy torchvision's "
            "resnet18-f37072fd.pth from an online machine and pass --pretrained PATH/TO/it.pth") from None
    return load_backbone(build_model(num_classes, dropout), imagenet)


def load_backbone(model: nn.Module, state: dict) -> nn.Module:
    """Load every weight except the classification head (whose class count differs)."""
    backbone = {k.removeprefix("module."): v.float() for k, v in state.items()
                if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise TrainingError(f"initial weights do not fit ResNet18: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# ---------------------------------------------------------------- loops

@dataclass
class EpochResult:
    loss: float
    metrics: dict
    skipped: list


@dataclass
class Evaluation(EpochResult):
    logits: torch.Tensor   # (n, classes) before any temperature
    labels: torch.Tensor


def autocast(device: torch.device) -> torch.autocast:
    dtype = resolve_precision("auto", device)  # scan's rule: bf16 (else fp16) on CUDA, fp32 on the CPU
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, spec: ModelSpec, device: torch.device,
                    progress: Progress) -> EpochResult:
    model.train()
    total, count, skipped = 0.0, 0, []
    for gray, labels, bad in progress(loader, "train"):
        skipped += bad
        if gray is None or labels is None:
            continue
        x, labels = model_input(gray.to(device, non_blocking=True), spec), labels.to(device)
        with autocast(device):
            loss = criterion(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(labels)
        count += len(labels)
    return EpochResult(loss=total / max(count, 1), metrics={}, skipped=skipped)


def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, spec: ModelSpec, device: torch.device,
             class_names: list[str], progress: Progress, what: str = "val",
             temperature: float = 1.0, positive: Sequence[int] | None = None) -> Evaluation:
    """Loss (of the raw logits) and metrics (of the probabilities at ``temperature``, ``positive`` the classes
    the binary metrics score as positive) on a split."""
    model.eval()
    total, labels_all, logits_all, skipped = 0.0, [], [], []
    with torch.inference_mode():
        for gray, labels, bad in progress(loader, what):
            skipped += bad
            if gray is None or labels is None:
                continue
            x, labels = model_input(gray.to(device, non_blocking=True), spec), labels.to(device)
            with autocast(device):
                logits = model(x)
            total += criterion(logits.float(), labels).item() * len(labels)
            labels_all.append(labels.cpu())
            logits_all.append(logits.float().cpu())
    if not labels_all:
        raise TrainingError(f"no readable images in the {what} split")
    labels, logits = torch.cat(labels_all), torch.cat(logits_all)
    probs = scaled_probabilities(logits, temperature).numpy()
    metrics = classification_metrics(labels.numpy(), probs.argmax(1), probs, class_names, positive)
    return Evaluation(loss=total / len(labels), metrics=metrics, skipped=skipped, logits=logits, labels=labels)


def features_and_logits(model: nn.Module, loader: DataLoader, spec: ModelSpec, device: torch.device,
                        progress: Progress, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled target-layer features, logits and labels of a split, read off one forward pass per batch
    by the engine scan uses (so the statistics describe exactly the features scan will score)."""
    model.eval()
    features, logits, labels = [], [], []
    with CamExplainer(model, autocast=resolve_precision("auto", device)) as explainer:
        for gray, batch_labels, _ in progress(loader, what):
            if gray is None or batch_labels is None:
                continue
            batch = explainer(model_input(gray.to(device, non_blocking=True), spec))
            features.append(batch.features)
            logits.append(batch.logits)
            labels.append(batch_labels)
    if not features:
        raise TrainingError(f"no readable images in the {what} split")
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def calibrate(model: nn.Module, splits: Splits, args: argparse.Namespace, spec: ModelSpec, device: torch.device,
              progress: Progress) -> Calibration:
    """OOD statistics from the (unaugmented) training images, temperature and threshold from validation."""
    train = features_and_logits(model, make_loader(splits["train"], args, augment=False, shuffle=False,
                                                   resize=spec.resize), spec,
                                device, progress, "calibrate train")
    val = features_and_logits(model, make_loader(splits["val"], args, augment=False, shuffle=False,
                                                 resize=spec.resize), spec,
                              device, progress, "calibrate val")
    try:
        return fit_calibration(train[0], train[2], val[0], val[1], val[2], len(spec.class_names))
    except ValueError as e:
        raise TrainingError(f"cannot calibrate the model: {e}") from None


def ece_at(result: Evaluation, temperature: float) -> float | None:
    confidence, predicted = scaled_probabilities(result.logits, temperature).max(1)
    return expected_calibration_error((predicted == result.labels).numpy(), confidence.numpy())


def make_progress(quiet: bool) -> Progress:
    if sys.stderr.isatty() and not quiet:
        from tqdm import tqdm
        return lambda loader, what: tqdm(loader, desc=what, leave=False)
    return lambda loader, what: loader


def is_better(result: EpochResult, best: float | None, select_by: str) -> tuple[bool, float]:
    score = result.loss if select_by == "loss" else -(result.metrics.get("roc_auc") or 0.0)
    return best is None or score < best, score


def train(args: argparse.Namespace, dropout: float, out: Path, class_names: list[str], splits: Splits) -> dict:
    """One full training run into ``out``; returns the test metrics of the best epoch."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    positive = args.positive_classes
    model, spec = initial_model(args, class_names, dropout)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    weights = class_weights(splits["train"], len(class_names)).to(device) if args.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    loaders = {"train": make_loader(splits["train"], args, augment=True, shuffle=True, resize=spec.resize),
               "val": make_loader(splits["val"], args, augment=False, shuffle=False, resize=spec.resize),
               "test": make_loader(splits["test"], args, augment=False, shuffle=False, resize=spec.resize)}
    progress = make_progress(quiet=False)
    config = training_config(args, dropout, class_names, splits)
    state = resume_state(out, model, optimizer) if args.resume else {"epoch": 0, "best": None, "history": []}
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        started = time.time()
        reseed(loaders["train"], args.seed, epoch)
        train_result = train_one_epoch(model, loaders["train"], criterion, optimizer, scaler, spec, device, progress)
        val_result = evaluate(model, loaders["val"], criterion, spec, device, class_names, progress,
                              positive=positive)
        better, score = is_better(val_result, state["best"], args.select_by)
        row = {"epoch": epoch, "train_loss": round(train_result.loss, 5), "val_loss": round(val_result.loss, 5),
               "val_accuracy": _round(val_result.metrics["accuracy"]), "val_auc": _round(val_result.metrics["roc_auc"]),
               "seconds": round(time.time() - started, 1),
               "skipped": len(train_result.skipped) + len(val_result.skipped)}
        state["history"].append(row)
        report_skips(train_result.skipped + val_result.skipped)
        print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']}, val loss {row['val_loss']}, "
              f"val acc {row['val_accuracy']}, val auc {row['val_auc']}{' (best)' if better else ''}", flush=True)
        if better:
            state["best"] = score
            save_checkpoint(out / "best.pt", model, spec, training=config, metrics={"epoch": epoch, **row})
        state["epoch"] = epoch
        save_resume_state(out, model, optimizer, state, spec)
        write_history(out, state["history"])
    if not (out / "best.pt").is_file():
        raise TrainingError(f"{out}: no best.pt to evaluate; run without --resume to train from the start")
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    calibration = calibrate(model, splits, args, spec, device, progress)
    val_result = evaluate(model, loaders["val"], criterion, spec, device, class_names, progress, positive=positive)
    test_result = evaluate(model, loaders["test"], criterion, spec, device, class_names, progress, "test",
                           temperature=calibration.temperature, positive=positive)
    report_skips(test_result.skipped)
    test_metrics = {**test_result.metrics, "loss": test_result.loss, "best_epoch": best["metrics"].get("epoch"),
                    "temperature": calibration.temperature, "ece_unscaled": ece_at(test_result, 1.0)}
    print(f"calibration: temperature {calibration.temperature:.4f}; ECE before -> after scaling: validation "
          f"{_round(ece_at(val_result, 1.0))} -> {_round(ece_at(val_result, calibration.temperature))}, test "
          f"{_round(test_metrics['ece_unscaled'])} -> {_round(test_metrics['ece'])}; OOD threshold "
          f"{calibration.ood.threshold:.3f} (Mahalanobis distance, 99.5th percentile of validation)", flush=True)
    save_checkpoint(out / "model.pt", model.cpu().to(memory_format=torch.contiguous_format), spec,
                    training=config, metrics={"test": jsonable(test_metrics), "best_epoch": test_metrics["best_epoch"]},
                    half=args.half_weights, temperature=calibration.temperature, ood=calibration.ood)
    (out / "test_metrics.json").write_text(json.dumps(jsonable(test_metrics), indent=2) + "\n")
    plot_learning_curve(out / "learning_curve.png", state["history"])
    print_test_metrics(test_metrics, out)
    return test_metrics


def class_weights(items: list[Item], num_classes: int) -> torch.Tensor:
    counts = np.bincount([label for _, label in items], minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def training_config(args: argparse.Namespace, dropout: float, class_names: list[str], splits: Splits) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "dropout": dropout,
            "pretrained": str(args.pretrained), "rotation": args.rotation, "seed": args.seed,
            "class_weights": bool(args.class_weights), "select_by": args.select_by,
            "images": {split: len(items) for split, items in splits.items()}, "optimizer": "Adam",
            "loss": "CrossEntropyLoss", "classes": list(class_names)}


def resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    path = out / "last.pt"
    if not path.is_file():
        raise TrainingError(f"--resume: {path} does not exist (nothing to resume)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
    except Exception as e:  # unreadable, or saved by a run with other classes or options
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"{path}: cannot resume from it: it does not match this run's model and "
                            f"options ({first_line[:160]})") from None
    print(f"resuming after epoch {saved['epoch']}", flush=True)
    return {"epoch": saved["epoch"], "best": saved["best"], "history": saved["history"]}


def save_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                      spec: ModelSpec) -> None:
    tmp = out / "last.pt.tmp"
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": state["epoch"],
                "best": state["best"], "history": state["history"], "class_names": list(spec.class_names)}, tmp)
    os.replace(tmp, out / "last.pt")


def write_history(out: Path, history: list[dict]) -> None:
    with open(out / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_learning_curve(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_skips(skipped: list[tuple[str, str]]) -> None:
    """One line per kind: films the selection rule left out, and files that could not be read."""
    not_selected = [(path, reason[len(SKIPPED):]) for path, reason in skipped if reason.startswith(SKIPPED)]
    unreadable = [(path, reason) for path, reason in skipped if not reason.startswith(SKIPPED)]
    for found, what in ((not_selected, "DICOM film(s) that scan would not score (--select)"),
                        (unreadable, "unreadable image(s)")):
        if found:
            path, reason = found[0]
            print(f"skipped {len(found)} {what}, e.g. {path}: {reason}", file=sys.stderr, flush=True)


def print_test_metrics(metrics: dict, out: Path) -> None:
    names = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "ece")
    print("test: " + ", ".join(f"{n} {_round(metrics[n])}" for n in names), flush=True)
    print(f"test confusion matrix (rows true, columns predicted, {metrics['class_names']}): "
          f"{metrics['confusion_matrix']}", flush=True)
    print(f"checkpoint: {out / 'model.pt'}", flush=True)


def compare_dropout(args: argparse.Namespace, class_names: list[str], splits: Splits) -> None:
    rows = []
    for p in (0.0, args.compare_dropout):
        print(f"== dropout {p} ==", flush=True)
        run_out = args.out / f"dropout_{p:g}"
        test = train(args, p, run_out, class_names, splits)
        with open(run_out / "epochs.csv", newline="") as f:
            history = list(csv.DictReader(f))
        best = next(r for r in history if int(r["epoch"]) == test["best_epoch"])
        rows.append({"dropout": p, "best_epoch": test["best_epoch"], "val_loss": best["val_loss"],
                     "val_accuracy": best["val_accuracy"], "val_auc": best["val_auc"],
                     **{f"test_{k}": _round(test[k]) for k in ("accuracy", "sensitivity", "specificity",
                                                               "precision", "f1", "roc_auc")}})
    with open(args.out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [header, "|" + "---|" * len(rows[0])] + ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        args.selection = selection(args)
        class_names, splits = discover_splits(args.data, args.val_split, args.seed)
        args.positive_classes = resolve_positive(args.positive, class_names)  # refused before anything is written
        print(f"classes {class_names}; images: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.compare_dropout is not None:
            compare_dropout(args, class_names, splits)
        else:
            train(args, args.dropout, args.out, class_names, splits)
    except (TrainingError, UsageError) as e:  # CheckpointError and a bad --device too
        print(f"train_model.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
