"""batchcam.synthetic: deterministic, plausible stand-ins for chest X-rays and their ImageFolder tree."""
from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from batchcam.synthetic import CLASSES, generate, write_imagefolder

SMALL = (96, 80)  # (width, height)


@pytest.mark.parametrize("label", CLASSES)
def test_generate_is_deterministic_for_a_seed(label):
    a = generate(7, label, SMALL)
    b = generate(7, label, SMALL)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.lungs, b.lungs)


@pytest.mark.parametrize("label", CLASSES)
def test_different_seeds_give_different_pictures(label):
    a = np.asarray(generate(1, label, SMALL).image)
    b = np.asarray(generate(2, label, SMALL).image)
    assert not np.array_equal(a, b)


def test_generate_returns_an_8bit_grayscale_image_of_the_requested_width_and_height():
    xray = generate(3, "PNEUMONIA", SMALL)
    assert xray.image.mode == "L"
    assert xray.image.size == SMALL
    assert xray.label == "PNEUMONIA"
    assert xray.mask.shape == xray.lungs.shape == (SMALL[1], SMALL[0])
    assert xray.mask.dtype == bool and xray.lungs.dtype == bool


def test_unknown_label_is_rejected():
    with pytest.raises(ValueError, match="label"):
        generate(0, "COVID", SMALL)


@pytest.mark.parametrize("seed", range(6))
def test_pneumonia_mask_is_non_empty_and_entirely_inside_the_lungs(seed):
    xray = generate(seed, "PNEUMONIA", (128, 112))
    assert xray.mask.any()
    assert xray.lungs.any()
    assert not (xray.mask & ~xray.lungs).any()


@pytest.mark.parametrize("seed", range(3))
def test_normal_mask_is_empty_but_lungs_are_drawn(seed):
    xray = generate(seed, "NORMAL", SMALL)
    assert not xray.mask.any()
    assert xray.lungs.any()


def test_pneumonia_opacities_brighten_the_lungs_where_the_mask_is():
    # Opacities are white patches on dark lung fields: the masked lung pixels are brighter on
    # average than the clear ones.
    xray = generate(5, "PNEUMONIA", (192, 192))
    pixels = np.asarray(xray.image, dtype=np.float64)
    clear_lung = xray.lungs & ~xray.mask
    assert pixels[xray.mask].mean() > pixels[clear_lung].mean()


def test_sizes_vary_between_512_and_2048_and_are_not_all_square_when_not_given():
    sizes = [generate(seed, "NORMAL").image.size for seed in range(5)]
    for width, height in sizes:
        assert 512 <= width <= 2048 and 512 <= height <= 2048
    assert len(set(sizes)) > 1
    assert any(width != height for width, height in sizes)


def _tree(root):
    """{(split, class): [suffixes]} of the image files directly in split/CLASS/."""
    found = defaultdict(list)
    for path in root.glob("*/*/*"):
        if path.is_file():
            split, label = path.parent.parent.name, path.parent.name
            found[(split, label)].append(path.suffix)
    return found


def test_write_imagefolder_writes_every_split_and_class_in_both_formats(tmp_path):
    paths = write_imagefolder(tmp_path, 40, seed=3, formats=("png", "jpg"), size_range=(64, 96))
    tree = _tree(tmp_path)

    assert {split for split, _ in tree} == {"train", "val", "test"}
    assert sorted(tree) == sorted((s, c) for s in ("train", "val", "test") for c in CLASSES)
    assert sum(len(v) for v in tree.values()) == len(paths)
    assert all(p.is_file() for p in paths)
    suffixes = {s for v in tree.values() for s in v}
    assert suffixes == {".png", ".jpg"}


def test_file_format_does_not_reveal_the_class(tmp_path):
    write_imagefolder(tmp_path, 40, seed=4, formats=("png", "jpg"), size_range=(64, 96))
    for (split, label), suffixes in _tree(tmp_path).items():
        # every split/class folder with at least four images holds both formats
        if len(suffixes) >= 4:
            assert set(suffixes) == {".png", ".jpg"}, (split, label, suffixes)
    per_class = defaultdict(lambda: defaultdict(int))
    for (_, label), suffixes in _tree(tmp_path).items():
        for s in suffixes:
            per_class[label][s] += 1
    for label in CLASSES:
        png, jpg = per_class[label][".png"], per_class[label][".jpg"]
        assert png > 0 and jpg > 0
        assert abs(png - jpg) <= 2, (label, png, jpg)


def test_write_imagefolder_images_are_readable_grayscale_within_the_size_range(tmp_path):
    paths = write_imagefolder(tmp_path, 12, seed=5, formats=("png", "jpg"), size_range=(64, 96))
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "L"
            assert all(64 <= side <= 96 for side in image.size), (path, image.size)


def test_write_imagefolder_is_deterministic_for_a_seed(tmp_path):
    a = write_imagefolder(tmp_path / "a", 10, seed=9, size_range=(64, 80))
    b = write_imagefolder(tmp_path / "b", 10, seed=9, size_range=(64, 80))
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()


def test_save_masks_writes_one_mask_per_image_outside_the_class_folders(tmp_path):
    paths = write_imagefolder(tmp_path, 12, seed=6, size_range=(64, 96), save_masks=True)
    for path in paths:
        split, label = path.parent.parent.name, path.parent.name
        mask_path = tmp_path / ".masks" / split / label / f"{path.stem}.png"
        assert mask_path.is_file(), mask_path
        with Image.open(mask_path) as mask_image, Image.open(path) as image:
            mask = np.asarray(mask_image)
            assert mask_image.size == image.size
        assert set(np.unique(mask)) <= {0, 255}
        if label == "PNEUMONIA":
            assert mask.any(), mask_path
        else:
            assert not mask.any(), mask_path
    # masks never land inside split/CLASS/, where a training run would take them for images
    assert not any(p.is_dir() for p in tmp_path.glob("*/*/masks"))


def test_without_save_masks_no_masks_are_written(tmp_path):
    write_imagefolder(tmp_path, 8, seed=6, size_range=(64, 80))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "train", "val"]


@pytest.mark.parametrize("splits", [[], ["--no-splits"]])
def test_scanning_the_generators_output_finds_only_the_xrays_not_the_masks(tmp_path, splits):
    """A mask under OUT/masks/train/PNEUMONIA/ was scored as a labelled PNEUMONIA X-ray."""
    from batchcam.decode.discover import discover
    from batchcam.synthetic import main

    out = tmp_path / "synthetic"
    assert main([str(out), "--count", "8", "--min-size", "64", "--max-size", "80", "--masks", *splits]) == 0
    masks = sorted(p for p in out.rglob("*.png") if ".masks" in p.parts)
    images = sorted(p for p in out.rglob("*") if p.is_file() and ".masks" not in p.parts)
    assert len(masks) == len(images) >= 8
    found = [candidate.path for candidate in discover(out).candidates]
    assert sorted(found) == images


def test_help_works_when_python_strips_docstrings():
    """``python -OO`` sets every ``__doc__`` to None: the description once came from a docstring."""
    done = subprocess.run([sys.executable, "-OO", "-m", "batchcam.synthetic", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ImageFolder tree" in done.stdout
