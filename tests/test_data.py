"""Data: the embedded digits, image folders (and everything wrong with them), preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vig_pyg.data import (
    DIGITS_CLASSES,
    EvalResize,
    ImageFolderDataset,
    Preprocessing,
    TrainCrop,
    batch_transform,
    load_digits_split,
    pil_to_uint8,
    scan_image_folder,
)
from vig_pyg.errors import DataError, one_line


def make_folder(root: Path, classes=("cat", "dog"), n_train: int = 3, n_val: int = 2, size=(30, 24)) -> Path:
    """A tiny ImageNet-layout folder: one colour per class, jpg and png mixed."""
    colours = [(200, 40, 40), (40, 40, 200), (40, 200, 40)]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", size, colours[c % len(colours)])
                img.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


# -- digits ---------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_uint8() -> None:
    train, val = load_digits_split(16)
    assert len(train) + len(val) == 1797 and abs(len(val) - 0.2 * 1797) < 10
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and 0 <= y < 10
    assert train.classes == DIGITS_CLASSES
    counts = torch.bincount(val.targets, minlength=10)
    assert counts.min() >= 30  # every class is in the validation split
    _, val2 = load_digits_split(16)
    assert torch.equal(val.targets, val2.targets) and torch.equal(val.images, val2.images)
    # Changing the image size does not change which images are held out.
    _, val3 = load_digits_split((20, 24))
    assert torch.equal(val.targets, val3.targets) and val3[0][0].shape == (3, 20, 24)


# -- image folders --------------------------------------------------------------------------------------
def test_scan_lists_samples_by_sorted_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    splits = scan_image_folder(root)
    assert splits["train"].classes == ["cat", "dog"]
    assert len(splits["train"].samples) == 6 and len(splits["val"].samples) == 4
    assert {t for _, t in splits["val"].samples} == {0, 1}
    assert set(scan_image_folder(root, splits=("val",))) == {"val"}


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing", "does not exist"),
        ("empty", "has no train/ folder"),
        ("no_classes", "has no class folders"),
        ("no_images", "has no images"),
        ("empty_class", "hold no images"),
        ("val_missing_class", "missing from"),
        ("val_extra_class", "have no training images"),
        ("corrupt", "is not a readable image"),
        ("truncated", "is not a readable image"),
    ],
)
def test_bad_folders_get_one_clear_error(tmp_path: Path, breakage: str, expected: str) -> None:
    root = tmp_path / "data"
    if breakage == "empty":
        root.mkdir()
    elif breakage == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif breakage == "no_images":
        (root / "train" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "notes.txt").write_text("not an image")
    elif breakage != "missing":
        make_folder(root)
        if breakage == "empty_class":
            (root / "train" / "fox").mkdir()
        elif breakage == "val_missing_class":
            for f in (root / "val" / "dog").iterdir():
                f.unlink()
            (root / "val" / "dog").rmdir()
        elif breakage == "val_extra_class":
            make_folder(tmp_path / "extra", classes=("cat", "dog", "owl"))
            (tmp_path / "extra" / "val" / "owl").rename(root / "val" / "owl")
        elif breakage == "corrupt":
            (root / "train" / "cat" / "bad.jpg").write_bytes(b"this is not a jpeg")
        elif breakage == "truncated":
            Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "train" / "dog" / "big.png")
            data = (root / "train" / "dog" / "big.png").read_bytes()
            (root / "train" / "dog" / "big.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=expected) as info:
        scan_image_folder(root)
    assert "\n" not in str(info.value)


def test_each_file_is_counted_once_through_symlinks(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    cat = root / "train" / "cat"
    (cat / "loop").symlink_to(".")  # a symlink loop
    (cat / "again").symlink_to(cat)  # a second way into the same folder
    (cat / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(cat / ".hidden" / "x.png")  # e.g. a notebook's checkpoint copies
    (root / "train" / "dog" / "cats").symlink_to(cat)  # another class's folder, linked in
    splits = scan_image_folder(root)
    counts = [sum(1 for _, t in splits["train"].samples if t == c) for c in range(2)]
    assert counts == [3, 6]  # cat's three images once; dog's three plus the three linked in


def test_16_bit_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np

    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as img:
        assert img.mode.startswith("I")  # Pillow opens 16-bit greyscale PNGs as I;16
        x = pil_to_uint8(img)
    assert x.shape == (3, 4, 4) and x[:, 0].tolist() == [[0, 1, 128, 255]] * 3
    root = make_folder(tmp_path / "data")
    Image.fromarray(values).save(root / "train" / "cat" / "wide.png")
    ds = ImageFolderDataset(scan_image_folder(root)["train"], pil_to_uint8)
    sample = next(x for (p, _), (x, _) in zip(ds.samples, ds) if p.endswith("wide.png"))
    assert sample[0, 0].tolist() == [0, 1, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert pil_to_uint8(floats)[0, 0].tolist() == [0, 128, 255]


def test_unreadable_image_found_at_load_time_names_the_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "cat" / "zz.jpg"
    bad.write_bytes(b"garbage")
    splits = scan_image_folder(root, verify=False)  # too many images to check up front
    ds = ImageFolderDataset(splits["train"], EvalResize(Preprocessing(input_size=(3, 16, 16))))
    with pytest.raises(DataError, match=r"zz\.jpg") as info:
        ds[[p for p, _ in ds.samples].index(str(bad))]
    assert one_line(info.value).startswith(str(bad))


def test_dataset_labels_follow_given_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    split = scan_image_folder(root)["val"]
    ds = ImageFolderDataset(split, EvalResize(Preprocessing(input_size=(3, 16, 16))), classes=["dog", "cat"])
    assert [t for _, t in ds.samples] == [1, 1, 0, 0]  # cat is index 1 in the given order
    with pytest.raises(DataError, match="not among the model's"):
        ImageFolderDataset(split, EvalResize(Preprocessing(input_size=(3, 16, 16))), classes=["dog"])


# -- preprocessing --------------------------------------------------------------------------------------
def test_eval_resize_follows_timm_geometry() -> None:
    # 224 at crop_pct 0.875: shorter side to 256, then the centre 224x224.
    img = Image.new("RGB", (512, 300))
    img.paste((255, 0, 0), (0, 0, 512, 300))
    img.paste((0, 0, 255), (246, 0, 266, 300))  # a blue stripe in the middle
    x = EvalResize(Preprocessing(input_size=(3, 224, 224), crop_pct=0.875))(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    assert x[2, 112, 112] > 200 and x[0, 112, 5] > 200  # the stripe stays centred, the edges red


def test_train_crop_and_batch_transform() -> None:
    pre = Preprocessing(input_size=(3, 24, 24))
    x = TrainCrop(pre)(Image.new("RGB", (50, 37), (255, 255, 255)))
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
    batch = torch.full((2, 3, 24, 24), 255, dtype=torch.uint8)
    out = batch_transform(pre)(batch)
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    for kind in ("digits", "imagenet"):
        aug = batch_transform(pre, kind)(batch)
        assert aug.shape == out.shape and aug.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown augmentation"):
        batch_transform(pre, "mixup")


def test_preprocessing_round_trips_as_plain_values() -> None:
    pre = Preprocessing(input_size=(3, 40, 48), mean=(0.4, 0.5, 0.6), crop_pct=0.95, interpolation="bilinear")
    d = pre.to_dict()
    assert all(isinstance(v, list | float | str) for v in d.values())
    assert Preprocessing.from_dict(d) == pre and pre.size == (40, 48)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="area")
    assert pil_to_uint8(Image.new("L", (5, 4), 7)).shape == (3, 4, 5)
