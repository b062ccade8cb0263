"""Synthetic chest-radiograph-like images, for tests, samples and the demo model.

Real chest X-rays cannot ship with this project, so the generator draws what a classifier and a
heatmap need to be exercised honestly: a body silhouette, two dark lung fields, ribs, the spine and
mediastinum, the heart shadow, noise, and varied size, contrast and gamma. PNEUMONIA images carry
patchy opacities inside the lungs, and the generator returns their mask so tests can check that a
heatmap points at the evidence. Everything is deterministic from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("NORMAL", "PNEUMONIA")
SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
MASKS_FOLDER = ".masks"  # hidden: scanning or training on the output never finds the masks


@dataclass
class SyntheticXray:
    image: Image.Image        # 8-bit grayscale
    label: str                # "NORMAL" or "PNEUMONIA"
    mask: np.ndarray          # bool (height, width): where the opacities are; all False for NORMAL
    lungs: np.ndarray         # bool (height, width): the lung fields


def generate(seed: int, label: str, size: tuple[int, int] | None = None) -> SyntheticXray:
    """One synthetic radiograph of the given class; ``size`` is (width, height), else drawn 512-2048."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    rng = np.random.default_rng([seed, CLASSES.index(label)])
    width, height = size or _random_size(rng)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    anatomy = _Anatomy.draw(rng)
    lungs = anatomy.lung_mask(x, y)
    picture = anatomy.render(x, y, lungs, rng)
    mask = np.zeros((height, width), dtype=bool)
    if label == "PNEUMONIA":
        opacity, mask = _opacities(x, y, lungs, anatomy, rng)
        picture += opacity
    return SyntheticXray(image=_finish(picture, width, rng), label=label, mask=mask, lungs=lungs)


def write_imagefolder(root: str | Path, count: int, *, seed: int = 0, splits: dict[str, float] | None = None,
                      formats: tuple[str, ...] = ("png",), size_range: tuple[int, int] = (512, 2048),
                      save_masks: bool = False) -> list[Path]:
    """Write an ImageFolder tree (``split/CLASS/name``) like the Kaggle chest X-ray set.

    ``count`` images are divided between the splits by their fractions and alternate between the
    classes; formats alternate through ``formats`` ("png", "jpg") independently of the class. A
    split named "" writes the class folders directly under ``root``. Masks, when asked for, go to
    ``root/.masks/split/CLASS/NAME.png``: a hidden folder, which batchcam's discovery never enters,
    so neither a scan of ``root`` nor training takes a mask for a labelled X-ray. Returns the
    written image paths.
    """
    root = Path(root)
    fractions = splits or SPLITS
    written = []
    index = 0
    for split, fraction in fractions.items():
        n_split = max(2, round(count * fraction))
        for i in range(n_split):
            label = CLASSES[i % 2]
            sample_seed = seed * 1_000_003 + index
            rng = np.random.default_rng(sample_seed)
            size = _random_size(rng, size_range)
            xray = generate(sample_seed, label, size)
            ext = formats[(index // len(CLASSES)) % len(formats)]  # formats must not leak the class
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{split or 'xray'}_{index:05d}.{ext}"
            save(xray.image, path)
            if save_masks:
                mask_dir = root / MASKS_FOLDER / split / label
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(xray.mask.astype(np.uint8) * 255).save(mask_dir / f"{path.stem}.png")
            written.append(path)
            index += 1
    return written


def save(image: Image.Image, path: Path) -> None:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=90)
    else:
        image.save(path)


def _random_size(rng: np.random.Generator, size_range: tuple[int, int] = (512, 2048)) -> tuple[int, int]:
    low, high = size_range
    width = int(rng.integers(low, high + 1))
    height = int(np.clip(width * rng.uniform(0.8, 1.25), low, high))
    return width, height


@dataclass
class _Anatomy:
    """Random proportions of one patient, in coordinates relative to the image (0..1)."""

    center_x: float
    lung_y: float
    lung_dx: float
    lung_rx: float
    lung_ry: float
    rib_period: float
    body_rx: float
    tissue: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "_Anatomy":
        return cls(center_x=rng.uniform(0.47, 0.53), lung_y=rng.uniform(0.45, 0.52),
                   lung_dx=rng.uniform(0.16, 0.2), lung_rx=rng.uniform(0.11, 0.14),
                   lung_ry=rng.uniform(0.24, 0.3), rib_period=rng.uniform(0.07, 0.1),
                   body_rx=rng.uniform(0.38, 0.46), tissue=rng.uniform(0.42, 0.55))

    def lung_centers(self) -> list[tuple[float, float]]:
        return [(self.center_x - self.lung_dx, self.lung_y), (self.center_x + self.lung_dx, self.lung_y)]

    def lung_mask(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mask = np.zeros(x.shape, dtype=bool)
        for cx, cy in self.lung_centers():
            mask |= ((x - cx) / self.lung_rx) ** 2 + ((y - cy) / self.lung_ry) ** 2 <= 1
        return mask & ~self.heart_mask(x, y)

    def heart_mask(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.center_x - 0.06) / 0.11) ** 2 + ((y - self.lung_y - 0.16) / 0.1) ** 2 <= 1

    def render(self, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        body = ((x - self.center_x) / self.body_rx) ** 2 + ((y - 0.58) / 0.55) ** 2 <= 1
        picture = np.where(body, self.tissue, 0.04).astype(np.float32)
        picture[lungs] = self.tissue * 0.3
        curve = (x - self.center_x) ** 2 * rng.uniform(1.5, 2.5)
        ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y + curve) / self.rib_period)
        picture += np.where(body, 0.14 * ribs ** 3, 0)
        spine = np.exp(-((x - self.center_x) / 0.035) ** 2) * (y > 0.15)
        picture += 0.35 * spine
        heart = self.heart_mask(x, y)
        picture[heart] = np.maximum(picture[heart], self.tissue * 1.1)
        return picture


def _opacities(x: np.ndarray, y: np.ndarray, lungs: np.ndarray, anatomy: _Anatomy,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Patchy consolidations: clusters of soft blobs inside one or both lungs."""
    opacity = np.zeros(x.shape, dtype=np.float32)
    for lung_index in rng.choice(2, size=int(rng.integers(1, 3)), replace=False):
        cx, cy = anatomy.lung_centers()[lung_index]
        center_x = cx + rng.uniform(-0.4, 0.4) * anatomy.lung_rx
        center_y = cy + rng.uniform(-0.5, 0.5) * anatomy.lung_ry
        for _ in range(int(rng.integers(4, 8))):
            bx = center_x + rng.normal(0, 0.03)
            by = center_y + rng.normal(0, 0.04)
            radius = rng.uniform(0.025, 0.05)
            opacity += rng.uniform(0.25, 0.45) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * radius ** 2))
    opacity = np.minimum(opacity, 0.5) * lungs
    return opacity, opacity > 0.08


def _finish(picture: np.ndarray, width: int, rng: np.random.Generator) -> Image.Image:
    picture = picture + rng.normal(0, rng.uniform(0.01, 0.03), picture.shape).astype(np.float32)
    picture = np.clip(picture * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1)
    picture = picture ** rng.uniform(0.8, 1.25)
    image = Image.fromarray((picture * 255).astype(np.uint8), mode="L")
    return image.filter(ImageFilter.GaussianBlur(radius=width / 700))


def main(argv: list[str] | None = None) -> int:
    """``python -m batchcam.synthetic OUT --count N``: write a synthetic ImageFolder tree."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m batchcam.synthetic",
                                     description="Write an ImageFolder tree (split/CLASS/name) of synthetic X-rays.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write train/, val/, test/ into")
    parser.add_argument("--count", type=int, default=200, help="images in all, split 70/15/15")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--formats", default="png,jpg", help="comma-separated file formats, alternated")
    parser.add_argument("--min-size", type=int, default=512, help="smallest side length drawn, px")
    parser.add_argument("--max-size", type=int, default=2048, help="largest side length drawn, px")
    parser.add_argument("--masks", action="store_true",
                        help=f"also save opacity masks under OUT/{MASKS_FOLDER}/ (hidden: a scan of OUT skips them)")
    parser.add_argument("--no-splits", action="store_true",
                        help="write OUT/NORMAL and OUT/PNEUMONIA directly, without train/val/test")
    args = parser.parse_args(argv)
    paths = write_imagefolder(args.out, args.count, seed=args.seed, formats=tuple(args.formats.split(",")),
                              splits={"": 1.0} if args.no_splits else None,
                              size_range=(args.min_size, args.max_size), save_masks=args.masks)
    print(f"wrote {len(paths)} images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
