"""Image folders in the ImageNet layout: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``.

Everything that can be wrong with such a folder is found before training starts (and before a run
directory is touched) and reported as one :class:`~vig_pyg.errors.DataError` that says what to fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from vig_pyg.errors import DataError

__all__ = ["IMG_EXTENSIONS", "FolderSplit", "ImageFolderDataset", "check_image", "scan_image_folder"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_LAYOUT = "expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (png works too)"
# Above this many images the up-front check of every file would take minutes (ImageNet: 1.3 M); an
# unreadable file is then still reported, when training reaches it.
VERIFY_LIMIT = 20_000


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: class names (sorted) and ``(path, class index)`` samples."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _scan_split(split_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    files = {}
    for c in classes:
        files[c] = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(split_dir / c, followlinks=True)
            for f in names
            if _is_image(f)
        )
    return classes, files


def check_image(path: str | os.PathLike) -> None:
    """Decode ``path`` fully; raise a :class:`DataError` naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path} is not a readable image ({err}); remove or replace the file and run again"
        ) from None


def scan_image_folder(
    root: str | os.PathLike, splits: Sequence[str] = ("train", "val"), verify: bool | None = None
) -> dict[str, FolderSplit]:
    """Check an image folder and list its samples.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        splits: the splits needed (``("val",)`` for evaluation).
        verify: decode every image up front (``None``: when there are at most ``VERIFY_LIMIT`` images).

    Raises:
        DataError: the folder or a split is missing or empty, a class has no images, a class of ``train``
            is missing from ``val`` (or the other way round), or an image cannot be decoded.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {_LAYOUT}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass --data DIR where {_LAYOUT}")
    found: dict[str, tuple[list[str], dict[str, list[str]]]] = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{root} has no {split}/ folder; {_LAYOUT}")
        classes, files = _scan_split(split_dir)
        if not classes:
            raise DataError(f"{split_dir} has no class folders; {_LAYOUT}")
        if not any(files.values()):
            raise DataError(
                f"{split_dir} has no images ({', '.join(IMG_EXTENSIONS)}) in its class folders; {_LAYOUT}"
            )
        empty = [c for c in classes if not files[c]]
        if empty:
            raise DataError(
                f"class folder(s) {', '.join(map(repr, empty[:5]))} in {split_dir} hold no images; add "
                "images or remove the folder(s)"
            )
        found[split] = (classes, files)
    if "train" in found and "val" in found:
        train_c, val_c = set(found["train"][0]), set(found["val"][0])
        if train_c - val_c:
            missing = sorted(train_c - val_c)
            raise DataError(
                f"class(es) {', '.join(map(repr, missing[:5]))} of {root / 'train'} are missing from "
                f"{root / 'val'}; every class needs validation images"
            )
        if val_c - train_c:
            extra = sorted(val_c - train_c)
            raise DataError(
                f"class(es) {', '.join(map(repr, extra[:5]))} of {root / 'val'} have no training images in "
                f"{root / 'train'}; add them there or remove them from val"
            )
    total = sum(len(f) for _, files in found.values() for f in files.values())
    if verify is None:
        verify = total <= VERIFY_LIMIT
        if not verify:
            log.info("%d images: not decoding each one up front (an unreadable one stops the run)", total)
    if verify:
        for _, files in found.values():
            for paths in files.values():
                for p in paths:
                    check_image(p)
    out = {}
    for split, (classes, files) in found.items():
        index = {c: i for i, c in enumerate(classes)}
        samples = [(p, index[c]) for c in classes for p in files[c]]
        out[split] = FolderSplit(root / split, classes, samples)
    return out


class ImageFolderDataset(Dataset):
    """Samples of a :class:`FolderSplit` through a transform (PIL image -> ``uint8`` tensor).

    Args:
        split: the scanned split.
        transform: e.g. :class:`~vig_pyg.data.transforms.EvalResize` or
            :class:`~vig_pyg.data.transforms.TrainCrop`.
        classes: class names defining the label indices (default: the split's own); lets a validation
            split be labelled the way the training split or a checkpoint numbers the classes.
    """

    def __init__(
        self,
        split: FolderSplit,
        transform: Callable[[Image.Image], Tensor],
        classes: list[str] | None = None,
    ) -> None:
        self.transform = transform
        self.classes = list(classes) if classes is not None else list(split.classes)
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [c for c in split.classes if c not in index]
        if missing:
            raise DataError(
                f"class(es) {', '.join(map(repr, missing[:5]))} in {split.root} are not among the model's "
                f"{len(self.classes)} classes; evaluate on a folder with the training classes"
            )
        self.samples = [(p, index[split.classes[t]]) for p, t in split.samples]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, target = self.samples[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # decodes the whole file, so a truncated one fails here
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(
                f"{path} is not a readable image ({err}); remove or replace the file and run again"
            ) from None
        return self.transform(rgb), target
