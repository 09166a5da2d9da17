"""The data of a training run: the digits or an image folder, subsets, validation shards, fingerprints."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from vig_pyg.data.digits import DIGITS_CLASSES, load_digits_split
from vig_pyg.data.folder import FolderSplit, ImageFolderDataset, folder_fingerprint, scan_image_folder
from vig_pyg.data.transforms import EvalResize, Preprocessing, TrainCrop
from vig_pyg.errors import DataError
from vig_pyg.models import get_pretrained_cfg
from vig_pyg.train.config import TrainConfig

__all__ = [
    "RunData",
    "Shard",
    "build_datasets",
    "check_same_data",
    "default_workers",
    "limit_samples",
    "scan",
]

log = logging.getLogger("vig_pyg.train")


@dataclass
class RunData:
    train: Dataset
    val: Dataset
    classes: list[str]
    pre: Preprocessing
    augment: str


def limit_samples(ds: Dataset, n: int | None) -> Dataset:
    """An evenly spaced subset of ``n`` samples.

    Folder samples are sorted by class, so the first ``n`` would often all be of one class.
    """
    total = len(ds)  # type: ignore[arg-type]
    if n is None or n >= total:
        return ds
    return Subset(ds, [i * total // n for i in range(max(n, 0))])


def scan(config: TrainConfig) -> tuple[dict[str, FolderSplit] | None, list[str]]:
    """The checked splits of ``config.data`` (``None`` for the digits) and the class names."""
    if config.data is None:
        return None, list(DIGITS_CLASSES)
    splits = scan_image_folder(config.data)
    return splits, splits["train"].classes


def check_same_data(
    splits: Mapping[str, FolderSplit] | None,
    saved: Mapping[str, Any] | None,
    saved_path: str | None,
    path: str | None,
) -> None:
    """Refuse to resume a run on other images than it started with (the same images elsewhere are fine).

    Args:
        splits: the scanned data of this invocation (``None``: the digits).
        saved: the fingerprint the run recorded (``None`` for the digits, or a checkpoint that has none).
        saved_path, path: where the run's data was, and where it is now.
    """
    if (splits is None) != (saved_path is None):
        was = "the embedded digits" if saved_path is None else saved_path
        raise DataError(
            f"the run was trained on {was}; resume it on the same data (drop --data, or pass the folder "
            "the run used)"
        )
    if splits is None or saved is None:
        return
    now = folder_fingerprint(splits)
    if now == saved:
        if path != saved_path:
            log.info("the run's data moved from %s to %s (same classes and images)", saved_path, path)
        return
    if now["classes"] != saved["classes"]:
        differs = f"classes {now['classes'][:5]} where the run had {saved['classes'][:5]}"
    else:
        counts = [
            f"{split}: {now['splits'][split]['images']} images (the run had {info['images']})"
            for split, info in saved["splits"].items()
            if split in now["splits"]
        ]
        differs = f"other images ({'; '.join(counts)})"
    if path != saved_path:
        raise DataError(
            f"{path} holds {differs} than the run's data ({saved_path}); resume with the folder of the same "
            "images, or start a new run with another --out"
        )
    log.warning("the images in %s changed since the run started (%s); resuming on them", path, differs)


def build_datasets(
    config: TrainConfig, splits: Mapping[str, FolderSplit] | None, classes: list[str], model: nn.Module
) -> RunData:
    """Training and validation sets at the model's input size, with the preprocessing they imply."""
    size = tuple(model.img_size)  # type: ignore[attr-defined]
    if splits is None:
        # The digits are made at the input size: no resize or crop at evaluation.
        pre = Preprocessing(input_size=(3, *size), crop_pct=1.0)  # type: ignore[arg-type]
        train, val = load_digits_split(size, config.val_fraction, seed=0)  # type: ignore[arg-type]
        augment = "digits"
    else:
        cfg = get_pretrained_cfg(config.model)
        pre = Preprocessing(
            input_size=(3, *size),  # type: ignore[arg-type]
            crop_pct=cfg.crop_pct if cfg else 0.9,
            interpolation=cfg.interpolation if cfg else "bicubic",
        )
        train = ImageFolderDataset(splits["train"], TrainCrop(pre))
        val = ImageFolderDataset(splits["val"], EvalResize(pre), classes=classes)
        augment = "imagenet"
    return RunData(
        limit_samples(train, config.limit_train), limit_samples(val, config.limit_val), classes, pre, augment
    )


class Shard(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank``: an exact split of the validation set (no padding)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_workers(config_workers: int | None, in_memory: bool) -> int:
    if config_workers is not None:
        return config_workers
    return 0 if in_memory else min(4, os.cpu_count() or 1)
