"""Image folders in the ImageNet layout: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``.

Everything that can be wrong with such a folder is found before training starts (and before a run
directory is touched) and reported as one :class:`~vig_pyg.errors.DataError` that says what to fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from vig_pyg.data.transforms import to_rgb
from vig_pyg.errors import DataError

__all__ = [
    "IMG_EXTENSIONS",
    "FolderSplit",
    "ImageFolderDataset",
    "check_image",
    "folder_fingerprint",
    "open_image",
    "scan_image_folder",
]

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


def _walk_images(top: str) -> list[str]:
    """Image files under ``top``, symlinked folders followed, each folder and each file counted once.

    A folder reached twice (a symlink loop such as ``loop -> .``, or two links to one folder) is walked
    once, and a file reached through several paths is listed once, under the first path in sorted order.
    Hidden files and folders (``.name``) are skipped.
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable or vanished: nothing to list
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subfolders.append(e.path)
                elif e.is_file() and _is_image(e.name):
                    fst = e.stat()
                    if (fst.st_dev, fst.st_ino) not in seen_files:
                        seen_files.add((fst.st_dev, fst.st_ino))
                        found.append(e.path)
            except OSError:  # a broken link
                continue
        stack.extend(reversed(subfolders))  # depth-first, in sorted order
    return sorted(found)


def _scan_split(split_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    return classes, {c: _walk_images(str(split_dir / c)) for c in classes}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully as 8-bit RGB (:func:`~vig_pyg.data.transforms.to_rgb`).

    Raises:
        DataError: naming the file, when it cannot be read.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(img)  # decodes the whole file, so a truncated one fails here
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path} is not a readable image ({err}); remove or replace the file and run again"
        ) from None


def check_image(path: str | os.PathLike) -> None:
    """Decode ``path`` fully; raise a :class:`DataError` naming the file when it cannot be read."""
    open_image(path)


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


def folder_fingerprint(splits: Mapping[str, FolderSplit]) -> dict[str, Any]:
    """What identifies the images of a scanned folder wherever it lies: the classes, and per split the
    number of images and a SHA-256 of their paths (relative to the split) and sizes.

    A training run records it, so that ``--resume`` accepts the same images moved to another folder.
    """
    out: dict[str, Any] = {"classes": [], "splits": {}}
    for name, split in sorted(splits.items()):
        h = hashlib.sha256()
        for path, target in split.samples:
            rel = os.path.relpath(path, split.root)
            h.update(f"{split.classes[target]}\0{rel}\0{os.path.getsize(path)}\n".encode())
        out["splits"][name] = {"images": len(split.samples), "digest": h.hexdigest()}
        out["classes"] = list(split.classes)
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
        return self.transform(open_image(path)), target
