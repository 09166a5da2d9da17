"""The configuration of a training run: its options, their checks, and what a resumed run keeps."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vig_pyg.errors import RunDirError, UsageError

__all__ = ["TrainConfig", "check_config", "normalise", "resume_config"]

log = logging.getLogger("vig_pyg.train")

# Options that define a run: a resumed run takes them from its checkpoint, and asking for another value
# is an error (``epochs`` may be raised; ``data`` may name the same images in a new place, which the
# data's fingerprint checks; the rest only change how the run is executed).
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


def normalise(config: TrainConfig) -> TrainConfig:
    data = str(Path(config.data).expanduser().resolve()) if config.data is not None else None
    return replace(config, data=data, model_kwargs=dict(config.model_kwargs))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: TrainConfig) -> None:
    """Refuse values that cannot make a sensible run, all of them in one message.

    Raises:
        UsageError: naming every bad option with the value it got.
    """
    _check_plain(config.model_kwargs, "model_kwargs")
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    c = config
    need(_is_int(c.epochs) and c.epochs >= 1, f"epochs must be an integer >= 1 (got {c.epochs!r})")
    need(
        _is_int(c.batch_size) and c.batch_size >= 2,
        f"batch size must be an integer >= 2 for BatchNorm (got {c.batch_size!r})",
    )
    need(_is_number(c.lr) and c.lr > 0, f"lr must be a positive number (got {c.lr!r})")
    need(_is_number(c.min_lr) and c.min_lr >= 0, f"min lr must be a number >= 0 (got {c.min_lr!r})")
    need(
        _is_number(c.weight_decay) and c.weight_decay >= 0,
        f"weight decay must be a number >= 0 (got {c.weight_decay!r})",
    )
    need(
        _is_number(c.warmup_epochs) and c.warmup_epochs >= 0,
        f"warm-up epochs must be a number >= 0 (got {c.warmup_epochs!r})",
    )
    need(
        _is_number(c.drop_path) and 0.0 <= c.drop_path < 1.0,
        f"drop path must be in [0, 1) (got {c.drop_path!r})",
    )
    need(
        _is_number(c.label_smoothing) and 0.0 <= c.label_smoothing < 1.0,
        f"label smoothing must be in [0, 1) (got {c.label_smoothing!r})",
    )
    need(
        c.clip_grad is None or (_is_number(c.clip_grad) and c.clip_grad > 0),
        f"clip grad must be a positive gradient norm (got {c.clip_grad!r}); leave it out for no clipping",
    )
    need(
        _is_number(c.val_fraction) and 0.0 < c.val_fraction < 1.0,
        f"val fraction must be in (0, 1) (got {c.val_fraction!r})",
    )
    need(_is_int(c.seed) and c.seed >= 0, f"seed must be an integer >= 0 (got {c.seed!r})")
    for name in ("limit_train", "limit_val", "stop_after"):
        value = getattr(c, name)
        need(
            value is None or (_is_int(value) and value >= 1),
            f"{name.replace('_', ' ')} must be an integer >= 1 (got {value!r})",
        )
    need(
        c.workers is None or (_is_int(c.workers) and c.workers >= 0),
        f"workers must be an integer >= 0 (0 loads data in the main process; got {c.workers!r})",
    )
    if problems:
        raise UsageError("; ".join(problems))


def resume_config(
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
        and name not in _RUNTIME_FIELDS | {"epochs", "model_kwargs", "data"}
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
    # A new --data is taken here and checked against the run's data fingerprint once it is scanned.
    runtime["data"] = current.data if "data" in explicit else base.data
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
