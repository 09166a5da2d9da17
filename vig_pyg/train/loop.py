"""Training and evaluation: one process or many under torchrun (DistributedDataParallel).

The order of work in :func:`train` is chosen so that a failed run loses nothing: the data (and, when
resuming, the checkpoint) is checked first, the output directory is only touched once the first epoch
has finished, and every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import vig_pyg
from vig_pyg.data.digits import DIGITS_CLASSES, load_digits_split
from vig_pyg.data.folder import ImageFolderDataset, scan_image_folder
from vig_pyg.data.transforms import EvalResize, Preprocessing, TrainCrop, batch_transform
from vig_pyg.errors import DataError, RunDirError, UsageError, one_line
from vig_pyg.models import create_model, get_pretrained_cfg
from vig_pyg.train.checkpoint import (
    FORMAT,
    atomic_write_bytes,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from vig_pyg.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    cleanup,
    pick_device,
    setup_distributed,
)
from vig_pyg.train.schedule import WarmupCosine

__all__ = ["TrainConfig", "TrainResult", "evaluate", "evaluate_checkpoint", "train"]

log = logging.getLogger("vig_pyg.train")

# Options that define a run: a resumed run takes them from its checkpoint, and asking for another value
# is an error (``epochs`` may be raised; the rest only change how the run is executed).
_RUNTIME_FIELDS = frozenset({"out_dir", "workers", "device", "progress", "resume", "overwrite", "stop_after"})


@dataclass
class TrainConfig:
    """Everything :func:`train` needs.

    Args:
        model: a registered model name.
        model_kwargs: overrides for :func:`vig_pyg.create_model` (``img_size``, ``k``, ``conv``, ...).
        data: an image folder (``train/``, ``val/``), or ``None`` for the embedded digits.
        out_dir: where checkpoints and metrics go.
        epochs: training epochs.
        batch_size: images per step and process.
        lr: peak learning rate (AdamW).
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay (not applied to biases, norms and the position embedding).
        warmup_epochs: linear warm-up length (may be fractional).
        label_smoothing: of the cross-entropy loss.
        drop_path: stochastic depth rate of the model.
        clip_grad: clip the gradient norm to this value (``None``: no clipping).
        amp: bf16 autocast.
        sync_bn: SyncBatchNorm across processes (GPUs only; PyTorch's SyncBatchNorm has no CPU kernel).
        pretrained: start from these weights (a path or URL; official or vig_pyg layout).
        seed: seeds every RNG (plus the rank under torchrun).
        val_fraction: the digits' validation share.
        limit_train, limit_val: use only this many images, evenly spaced over the set (smoke tests).
        workers: data-loading processes (``None``: 0 for the in-memory digits, else up to 4).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: a progress bar per epoch (``None``: when stderr is a terminal).
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        overwrite: start a new run in an ``out_dir`` that holds one (its files are replaced after the first
            epoch of the new run).
        stop_after: stop after this many epochs of this invocation (``--resume`` continues).
    """

    model: str = "pvig_test"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    out_dir: str = "runs/train"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    clip_grad: float | None = None
    amp: bool = False
    sync_bn: bool = False
    pretrained: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    limit_train: int | None = None
    limit_val: int | None = None
    workers: int | None = None
    device: str = "auto"
    progress: bool | None = None
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        best_top1: best validation top-1 in percent.
        best_epoch: the epoch (1-based) that reached it.
        last_top1: validation top-1 of the last epoch.
        epochs_done: completed epochs of the run (over all invocations).
        out_dir: the run directory.
        history: one metrics row per completed epoch.
    """

    best_top1: float
    best_epoch: int
    last_top1: float
    epochs_done: int
    out_dir: Path
    history: list[dict[str, Any]]

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "last.pt"


# -- configuration --------------------------------------------------------------------------------------
def _check_plain(value: Any, what: str) -> None:
    """Checkpoints hold plain python values only (``torch.load(weights_only=True)``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for v in value:
            _check_plain(v, what)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, what)
            _check_plain(v, what)
        return
    raise UsageError(
        f"{what} holds {type(value).__name__} values; a training run stores only plain values (numbers, "
        "strings, lists): name a conv by its string, e.g. conv='gin'"
    )


def _normalise(config: TrainConfig) -> TrainConfig:
    data = str(Path(config.data).expanduser().resolve()) if config.data is not None else None
    return replace(config, data=data, model_kwargs=dict(config.model_kwargs))


def _check_config(config: TrainConfig) -> None:
    _check_plain(config.model_kwargs, "model_kwargs")
    problems = []
    if config.epochs < 1:
        problems.append(f"epochs must be at least 1 (got {config.epochs})")
    if config.batch_size < 2:
        problems.append(f"batch size must be at least 2 for BatchNorm (got {config.batch_size})")
    if not config.lr > 0:
        problems.append(f"lr must be positive (got {config.lr})")
    if not 0.0 <= config.drop_path < 1.0:
        problems.append(f"drop path must be in [0, 1) (got {config.drop_path})")
    if not 0.0 <= config.label_smoothing < 1.0:
        problems.append(f"label smoothing must be in [0, 1) (got {config.label_smoothing})")
    if config.stop_after is not None and config.stop_after < 1:
        problems.append(f"stop_after must be at least 1 (got {config.stop_after})")
    if problems:
        raise UsageError("; ".join(problems))


def _resume_config(
    current: TrainConfig, saved: Mapping[str, Any], explicit: Collection[str] | None
) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    if explicit is None:  # library use: treat every non-default value as asked for
        defaults = TrainConfig()
        explicit = {
            f.name for f in fields(TrainConfig) if getattr(current, f.name) != getattr(defaults, f.name)
        }
    conflicts = [
        f"{name}={getattr(base, name)!r} (asked: {getattr(current, name)!r})"
        for name in sorted(explicit)
        if name in known
        and name not in _RUNTIME_FIELDS | {"epochs", "model_kwargs"}
        and getattr(current, name) != getattr(base, name)
    ]
    # Model overrides are compared one by one: repeating some of them (e.g. only --k) is fine.
    conflicts += [
        f"{key}={base.model_kwargs.get(key)!r} (asked: {value!r})"
        for key, value in current.model_kwargs.items()
        if "model_kwargs" in explicit and base.model_kwargs.get(key) != value
    ]
    if conflicts:
        raise RunDirError(
            f"the run in {current.out_dir} was started with {', '.join(conflicts)}; a resumed run keeps its "
            "settings: drop those options, or start a new run with another --out"
        )
    runtime = {name: getattr(current, name) for name in _RUNTIME_FIELDS}
    epochs = current.epochs if "epochs" in explicit else base.epochs
    if epochs != base.epochs:
        log.warning(
            "the run was planned for %d epochs and now runs to %d: the learning-rate schedule is re-planned, "
            "so the result differs from a run planned for %d from the start",
            base.epochs,
            epochs,
            epochs,
        )
    return replace(base, **runtime, epochs=epochs)


# -- data -----------------------------------------------------------------------------------------------
@dataclass
class _Data:
    train: Dataset
    val: Dataset
    classes: list[str]
    pre: Preprocessing
    augment: str


def _limit(ds: Dataset, n: int | None) -> Dataset:
    """An evenly spaced subset of ``n`` samples.

    Folder samples are sorted by class, so the first ``n`` would often all be of one class.
    """
    total = len(ds)  # type: ignore[arg-type]
    if n is None or n >= total:
        return ds
    return Subset(ds, [i * total // n for i in range(max(n, 0))])


def _scan(config: TrainConfig) -> tuple[dict[str, Any] | None, list[str]]:
    if config.data is None:
        return None, list(DIGITS_CLASSES)
    splits = scan_image_folder(config.data)
    return splits, splits["train"].classes  # type: ignore[return-value]


def _datasets(
    config: TrainConfig, splits: dict[str, Any] | None, classes: list[str], model: nn.Module
) -> _Data:
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
    return _Data(_limit(train, config.limit_train), _limit(val, config.limit_val), classes, pre, augment)


class _Shard(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank``: an exact split of the validation set (no padding)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _default_workers(config_workers: int | None, in_memory: bool) -> int:
    if config_workers is not None:
        return config_workers
    return 0 if in_memory else min(4, os.cpu_count() or 1)


# -- model ----------------------------------------------------------------------------------------------
def _build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = {**config.model_kwargs, "drop_path_rate": config.drop_path}
    try:
        model = create_model(config.model, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    if config.pretrained:
        from vig_pyg.models import load_pretrained

        try:
            load_pretrained(model, config.pretrained)
        except FileNotFoundError as err:
            raise UsageError(f"{err}; check --pretrained") from None
        except (ValueError, ConnectionError) as err:
            raise UsageError(f"--pretrained {config.pretrained}: {err}") from None
    size = tuple(model.img_size)  # type: ignore[attr-defined]
    min_h, min_w = model.min_input_size  # type: ignore[attr-defined]
    if size[0] < min_h or size[1] < min_w:
        raise UsageError(
            f"img_size {size[0]}x{size[1]} is too small for {config.model} with these settings (the last "
            f"graph block would have fewer nodes than k); use --img-size {max(min_h, min_w)} or more, or a "
            "smaller --k"
        )
    return model, kwargs


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases, norm scales and the position embedding are not decayed (the usual ViT/ViG recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- one epoch ------------------------------------------------------------------------------------------
def _progress(loader: DataLoader, show: bool, desc: str):  # type: ignore[no-untyped-def]
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    transform: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    config: TrainConfig,
    info: DistInfo,
    show: bool,
    desc: str,
) -> dict[str, float]:
    model.train()
    device = info.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    bar = _progress(loader, show, desc)
    for step, (x, y) in enumerate(bar):
        x = transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach().double() * y.size(0)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.size(0)
        if show and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.lr:.2e}")  # type: ignore[union-attr]
    total_loss, total_correct, total_seen = all_reduce_sum([loss_sum.item(), correct.item(), seen], info)
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "train_top1": 100.0 * total_correct / max(total_seen, 1),
    }


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
        for x, y in _progress(loader, show, "eval"):
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


# -- files ----------------------------------------------------------------------------------------------
_METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "epoch_time_s",
    "best_val_top1",
]


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    # The whole history is rewritten (atomically) each epoch: a few hundred rows at most, and a resumed
    # run's files then always match its checkpoint.
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    lines = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())


def _check_out_dir(config: TrainConfig) -> None:
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; choose a folder")
    if config.resume:
        if not (out / "last.pt").is_file():
            raise RunDirError(
                f"nothing to resume in {out}: it has no last.pt; drop --resume to start a new run"
            )
        return
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise RunDirError(
            f"{out} already holds files; pass --resume to continue that run, --overwrite to replace it, "
            "or choose another --out"
        )


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run --------------------------------------------------------------------------------------------
def train(config: TrainConfig, explicit: Collection[str] | None = None) -> TrainResult:
    """Train a model; under torchrun every process calls this and DDP joins them.

    Args:
        config: the run.
        explicit: names of the options the user set (the CLI passes them) so that a resumed run can refuse
            conflicting ones; ``None``: every option that differs from its default.

    Returns:
        The best and last validation scores and the run directory.

    Raises:
        UsageError: bad data, a bad checkpoint, an output directory in the way, a bad option.
    """
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        info = setup_distributed(config.device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"could not set up training: {err}") from None
    try:
        return _train(config, info, explicit)
    finally:
        if not already:
            cleanup()


def _train(config: TrainConfig, info: DistInfo, explicit: Collection[str] | None) -> TrainResult:
    config = _normalise(config)
    _check_out_dir(config)
    ckpt = None
    if config.resume:
        ckpt = load_checkpoint(Path(config.out_dir) / "last.pt")
        config = _resume_config(config, ckpt["config"], explicit)
        config = _normalise(config)
    _check_config(config)
    if config.sync_bn and info.enabled and info.device.type == "cpu":
        raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop --sync-bn")

    _seed(config.seed + info.rank)
    splits, classes = _scan(config)  # checks the data folder before anything is written
    model, model_kwargs = _build_model(config, len(classes))
    data = _datasets(config, splits, classes, model)
    if len(data.train) < 2 * info.world_size:  # type: ignore[arg-type]
        raise DataError(f"{len(data.train)} training images are too few for {info.world_size} process(es)")  # type: ignore[arg-type]
    if len(data.val) == 0:  # type: ignore[arg-type]
        raise DataError("the validation set is empty; add images to val/ (or raise --limit-val)")

    device = info.device
    model.to(device)
    if config.sync_bn:
        if info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info("--sync-bn has no effect in a single process")
    core = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    train_sampler = DistributedSampler(
        data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    in_memory = splits is None
    workers = _default_workers(config.workers, in_memory)
    per_rank = len(train_sampler)
    train_loader = DataLoader(
        data.train,
        batch_size=min(config.batch_size, per_rank),
        sampler=train_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # A last batch of one image would break BatchNorm; dropping the remainder is the usual fix.
        drop_last=True,
    )
    val_loader = DataLoader(
        data.val,
        batch_size=config.batch_size,
        sampler=_Shard(len(data.val), info.rank, info.world_size),  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    train_tf = batch_transform(data.pre, data.augment).to(device)
    val_tf = batch_transform(data.pre).to(device)

    optimizer = torch.optim.AdamW(_param_groups(core, config.weight_decay), lr=config.lr)
    steps = len(train_loader)
    schedule = WarmupCosine(
        optimizer,
        config.lr,
        total_steps=config.epochs * steps,
        warmup_steps=round(config.warmup_epochs * steps),
        min_lr=config.min_lr,
    )
    history: list[dict[str, Any]] = []
    best_top1, best_epoch, start_epoch = -1.0, 0, 0
    if ckpt is not None:
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        history = list(ckpt["history"])
        best_top1, best_epoch, start_epoch = (
            float(ckpt["best_top1"]),
            int(ckpt["best_epoch"]),
            int(ckpt["epoch"]),
        )
        rngs = ckpt["rng"]
        if len(rngs) != info.world_size:
            log.warning(
                "resuming with %d process(es) where the run had %d: the data order and augmentation differ "
                "from an uninterrupted run",
                info.world_size,
                len(rngs),
            )
        restore_rng_state(rngs[info.rank % len(rngs)])
        log.info("resuming %s after epoch %d of %d", config.out_dir, start_epoch, config.epochs)
        if config.epochs < start_epoch:
            raise RunDirError(
                f"the run in {config.out_dir} has done {start_epoch} epochs already, more than --epochs "
                f"{config.epochs}; pass a larger --epochs or drop it"
            )

    out = Path(config.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    if info.is_main:
        stats = sum(p.numel() for p in core.parameters())
        log.info(
            "%s (%.2f M parameters) on %s: %d train / %d val images, %d classes, input %dx%d, %d process(es)",
            config.model,
            stats / 1e6,
            "the embedded digits" if config.data is None else config.data,
            len(data.train),  # type: ignore[arg-type]
            len(data.val),  # type: ignore[arg-type]
            len(classes),
            *data.pre.size,
            info.world_size,
        )

    show = info.is_main and (config.progress if config.progress is not None else sys.stderr.isatty())
    end = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    for epoch in range(start_epoch, end):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        lr = schedule.lr
        desc = f"epoch {epoch + 1}/{config.epochs}"
        try:
            row: dict[str, Any] = _train_epoch(
                model, train_loader, train_tf, optimizer, schedule, config, info, show, desc
            )
            if not math.isfinite(row["train_loss"]):
                raise UsageError(
                    f"training diverged (loss {row['train_loss']}) in epoch {epoch + 1}; lower --lr, set "
                    "--clip-grad or drop --amp, then start again (the checkpoints of earlier epochs are kept)"
                )
            row.update(evaluate(core, val_loader, val_tf, device, config.amp, info))
        except DataError as err:
            # Raised in a loader worker, the message arrives wrapped in the worker's traceback.
            raise DataError(one_line(err)) from None
        row.pop("count")
        is_best = row["val_top1"] > best_top1
        if is_best:
            best_top1, best_epoch = row["val_top1"], epoch + 1
        row = {
            "epoch": epoch + 1,
            **{k: float(v) for k, v in row.items()},
            "lr": float(lr),
            "epoch_time_s": time.perf_counter() - t0,
            "best_val_top1": best_top1,
        }
        history.append(row)
        rngs = all_gather_objects(capture_rng_state(), info)
        if info.is_main:
            state = {
                "format": FORMAT,
                "vig_pyg_version": vig_pyg.__version__,
                "epoch": epoch + 1,
                "model_name": config.model,
                "model_kwargs": model_kwargs,
                "num_classes": len(classes),
                "class_names": list(classes),
                "preprocessing": data.pre.to_dict(),
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "rng": rngs,
                "world_size": info.world_size,
                "config": asdict(config),
                "history": history,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "metrics": row,
            }
            save_checkpoint(state, out / "last.pt")
            if is_best:
                save_checkpoint(state, out / "best.pt")
            _write_metrics(out, history)
            if epoch == start_epoch:
                atomic_write_bytes(
                    out / "config.json", (json.dumps(asdict(config), indent=2) + "\n").encode()
                )
            log.info(
                "epoch %d/%d  train loss %.3f acc %.1f%%  val loss %.3f top-1 %.1f%% top-5 %.1f%%  "
                "lr %.2e  %.1fs%s",
                epoch + 1,
                config.epochs,
                row["train_loss"],
                row["train_top1"],
                row["val_loss"],
                row["val_top1"],
                row["val_top5"],
                lr,
                row["epoch_time_s"],
                "  *best" if is_best else "",
            )
        barrier(info)
    if info.is_main and best_epoch:
        log.info("best val top-1 %.1f%% at epoch %d; checkpoints in %s", best_top1, best_epoch, out)
    return TrainResult(
        best_top1=best_top1,
        best_epoch=best_epoch,
        last_top1=history[-1]["val_top1"] if history else float("nan"),
        epochs_done=len(history),
        out_dir=out,
        history=history,
    )


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
    val = _limit(val, limit)
    if len(val) == 0:  # type: ignore[arg-type]
        raise DataError("no validation images to evaluate")
    loader = DataLoader(
        val,
        batch_size=batch_size,
        num_workers=_default_workers(workers, splits is None),
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
