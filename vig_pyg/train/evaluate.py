"""Evaluation: top-1 / top-5 of a model over a loader, and of a checkpoint on a data set."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vig_pyg.data.digits import DIGITS_CLASSES, load_digits_split
from vig_pyg.data.folder import ImageFolderDataset, scan_image_folder
from vig_pyg.data.transforms import EvalResize, batch_transform
from vig_pyg.errors import DataError, UsageError, one_line
from vig_pyg.train.checkpoint import load_model
from vig_pyg.train.datasets import default_workers, limit_samples
from vig_pyg.train.distributed import DistInfo, all_reduce_sum, pick_device

__all__ = ["evaluate", "evaluate_checkpoint", "progress_bar"]

log = logging.getLogger("vig_pyg.train")


def progress_bar(loader: DataLoader, show: bool, desc: str):  # type: ignore[no-untyped-def]
    """``loader`` with a progress bar on stderr when ``show``."""
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    transform: nn.Module,
    device: torch.device,
    amp: bool = False,
    info: DistInfo | None = None,
    show: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Args:
        model: the classifier (not a DDP wrapper: evaluation shards are uneven and need no collectives).
        loader: yields ``uint8`` images and labels.
        transform: the batch transform (normalisation).
        device: where to run.
        amp: bf16 autocast.
        info: sums the counts over processes when distributed.
        show: a progress bar.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    try:
        for x, y in progress_bar(loader, show, "eval"):
            x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits = logits.float()
            top = logits.topk(min(5, logits.size(1)), dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    hit[:, 0].sum().double(),
                    hit.any(1).sum().double(),
                    torch.tensor(float(y.size(0)), dtype=torch.float64, device=device),
                ]
            )
    finally:
        model.train(was_training)
    loss, top1, top5, n = all_reduce_sum(sums.tolist(), info) if info is not None else sums.tolist()
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n, "count": n}


# -- evaluation of a checkpoint -------------------------------------------------------------------------
def evaluate_checkpoint(
    path: str | os.PathLike,
    data: str | None = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    amp: bool = False,
    limit: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 of a checkpoint on ``data``/val (or the digits' validation split).

    Args:
        path: a vig_pyg training checkpoint, or official/converted weights (then ``model_name`` is needed).
        data: an image folder with ``val/<class>/*``; ``None``: the embedded digits.
        model_name: the model of bare weights; checked against a training checkpoint's.
        model_kwargs: model overrides for bare weights of a non-standard configuration.
        batch_size, workers, device, amp: how to run.
        limit: only this many images, evenly spaced over the set.
        progress: a progress bar (``None``: when stderr is a terminal).

    Returns:
        ``val_top1``, ``val_top5``, ``val_loss``, ``count``, plus ``model`` and ``preprocessing``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be an integer >= 1 (got {batch_size!r})")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UsageError(
            f"workers must be an integer >= 0 (0 loads data in the main process; got {workers!r})"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be an integer >= 1 (got {limit!r})")
    splits = scan_image_folder(data, splits=("val",)) if data is not None else None
    model, ckinfo = load_model(path, model_name, model_kwargs)
    try:
        dev = pick_device(device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    pre = ckinfo.preprocessing
    if splits is None:
        names = ckinfo.class_names
        if names is None or any(c not in names for c in DIGITS_CLASSES):
            raise UsageError(
                f"{path} was not trained on the digits (its classes are not 0-9); pass --data DIR with the "
                "images it was trained for"
            )
        val_fraction = float((ckinfo.config or {}).get("val_fraction", 0.2))
        _, val_ds = load_digits_split(pre.size, val_fraction, seed=0)
        remap = torch.tensor([names.index(c) for c in DIGITS_CLASSES])
        val: Dataset = _Remapped(val_ds, remap)
    else:
        classes = ckinfo.class_names
        if classes is None:
            folder_classes = splits["val"].classes
            if len(folder_classes) > ckinfo.num_classes:
                raise DataError(
                    f"{data}/val has {len(folder_classes)} classes but the model predicts "
                    f"{ckinfo.num_classes}; evaluate on a folder of the model's classes"
                )
            log.info("the weights carry no class names: class i is the i-th folder of val/ in sorted order")
            classes = folder_classes
        val = ImageFolderDataset(splits["val"], EvalResize(pre), classes=classes)
    val = limit_samples(val, limit)
    if len(val) == 0:  # type: ignore[arg-type]
        raise DataError("no validation images to evaluate")
    loader = DataLoader(
        val,
        batch_size=batch_size,
        num_workers=default_workers(workers, splits is None),
        pin_memory=dev.type == "cuda",
    )
    model.to(dev)
    show = progress if progress is not None else sys.stderr.isatty()
    try:
        metrics = evaluate(model, loader, batch_transform(pre).to(dev), dev, amp, show=show)
    except DataError as err:
        raise DataError(one_line(err)) from None
    return {**metrics, "model": ckinfo.model_name, "preprocessing": pre.to_dict()}


class _Remapped(Dataset):
    """Relabels a data set's targets through ``mapping`` (a checkpoint's own class order)."""

    def __init__(self, ds: Dataset, mapping: Tensor) -> None:
        self.ds, self.mapping = ds, mapping

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.ds[i]
        return x, int(self.mapping[y])
