"""Training checkpoints: atomic writes, safe reads, RNG states, models rebuilt from checkpoints.

A training checkpoint is a dict of tensors and plain python values only, so that it loads with
``torch.load(weights_only=True)``; it carries everything needed to resume a run exactly (model, optimizer,
schedule, RNG states, epoch, metrics history) and to use the model later (model name and arguments,
class names, preprocessing).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vig_pyg.data.transforms import Preprocessing
from vig_pyg.errors import CheckpointError, UsageError
from vig_pyg.files import atomic_write, state_digest
from vig_pyg.models import (
    create_model,
    get_pretrained_cfg,
    load_pretrained,
    load_state_dict_file,
    save_pretrained,
)
from vig_pyg.models.checkpoint import CorruptFileError

__all__ = [
    "FORMAT",
    "CheckpointInfo",
    "capture_rng_state",
    "convert_checkpoint",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

#: Marks a vig_pyg training checkpoint (as opposed to a bare state dict).
FORMAT = "vig_pyg-train-1"
#: The entry holding the SHA-256 of everything else in a training checkpoint (:func:`state_digest`).
CHECKSUM = "checksum"
# What every training checkpoint holds (enough to rebuild and use the model), and what resuming needs too.
_MODEL_ENTRIES = (
    "model_name",
    "model_kwargs",
    "num_classes",
    "class_names",
    "preprocessing",
    "model",
    "epoch",
)
_RESUME_ENTRIES = ("optimizer", "scheduler", "rng", "config", "history", "best_top1", "best_epoch")


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` with a checksum of the contents, written atomically (:func:`atomic_write`).

    Raises:
        OutputError: the file could not be written; an earlier ``path`` is intact.
    """
    state = {k: v for k, v in obj.items() if k != CHECKSUM}
    state[CHECKSUM] = state_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def _read_error(path: Path, err: BaseException) -> CheckpointError:
    text = str(err).strip()
    # torch's own messages run on for several sentences; the first says what failed.
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__
    return CheckpointError(
        f"{path} cannot be read ({first}); the file may be truncated or not a checkpoint: use an intact "
        "copy (a run keeps best.pt beside last.pt) or start the run again with --overwrite"
    )


def _check_file(path: Path, hint: str) -> None:
    if path.is_dir():
        inside = [n for n in ("best.pt", "last.pt") if (path / n).is_file()]
        suggestion = f"; e.g. {path / inside[0]}" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: pass a file{suggestion}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {hint}")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, foreign pickles, ... raise many different types
        raise _read_error(path, err) from None


def _verify(obj: dict[str, Any], path: Path, needed: tuple[str, ...]) -> None:
    """Refuse a vig_pyg training checkpoint with missing entries or contents that fail the checksum."""
    missing = [key for key in needed if key not in obj]
    if missing:
        raise CheckpointError(
            f"{path} lacks the entries {', '.join(map(repr, missing))} of a vig_pyg training checkpoint "
            "(made by hand or by another program?); use a checkpoint written by `vig-pyg train`"
        )
    expected = obj.get(CHECKSUM)
    if expected is None:  # written before checkpoints carried one
        log.debug("%s carries no checksum (written by vig_pyg 0.1): not verified", path)
    elif state_digest(obj, exclude=(CHECKSUM,)) != expected:
        raise CheckpointError(
            f"{path} is corrupt: its contents do not match the checksum written with them; use an intact "
            "copy (a run keeps best.pt beside last.pt)"
        )


def load_checkpoint(path: str | os.PathLike, for_resume: bool = True) -> dict[str, Any]:
    """Read and verify a training checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the file.
        for_resume: also require what resuming a run needs (optimizer, schedule, RNG states, history).

    Raises:
        CheckpointError: the file is missing, unreadable (e.g. truncated), not a training checkpoint,
            lacks entries, or fails its checksum.
    """
    path = Path(path)
    _check_file(path, "check the path (or --out of the run)")
    obj = _torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a vig_pyg training checkpoint (no {FORMAT!r} marker); for official or "
            "converted weights use `vig-pyg eval FILE --model NAME`"
        )
    _verify(obj, path, _MODEL_ENTRIES + (_RESUME_ENTRIES if for_resume else ()))
    return obj


# -- random number generators ---------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states, as tensors and plain python values."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """The inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("the checkpoint's CUDA RNG states are for another GPU count; not restored")


# -- models from checkpoints ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its model.

    Attributes:
        model_name: the registered name.
        model_kwargs: the arguments the model was built with (besides ``num_classes``).
        num_classes: classifier outputs.
        class_names: names of the classes by index, or ``None`` when the checkpoint does not say (official
            ImageNet weights: the usual sorted-WordNet-id order).
        preprocessing: what inputs must look like.
        source: ``"train"`` (a vig_pyg training checkpoint) or ``"weights"`` (a bare state dict).
        epoch: completed epochs of a training checkpoint.
        config: the training configuration of a training checkpoint.
    """

    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    preprocessing: Preprocessing
    source: str
    epoch: int | None = None
    config: dict[str, Any] | None = None


def _head_size(state_dict: Mapping[str, Tensor]) -> int:
    for key in ("head.classifier.weight", "prediction.4.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 0


def _build(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def default_preprocessing(model_name: str, model: nn.Module) -> Preprocessing:
    """The official preprocessing of ``model_name`` (its PretrainedCfg) at the model's input size."""
    cfg = get_pretrained_cfg(model_name)
    size = tuple(getattr(model, "img_size", (224, 224)))
    if cfg is None:
        return Preprocessing(input_size=(3, *size))  # type: ignore[arg-type]
    return Preprocessing(
        input_size=(3, *size),  # type: ignore[arg-type]
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
    )


def load_model(
    path: str | os.PathLike, model_name: str | None = None, model_kwargs: Mapping[str, Any] | None = None
) -> tuple[nn.Module, CheckpointInfo]:
    """A model and its :class:`CheckpointInfo` from a vig_pyg training checkpoint or a bare state dict.

    Args:
        path: a training checkpoint (``last.pt``/``best.pt``), an official ``.pth``/``.pth.tar`` (converted
            on the fly) or a ``.safetensors`` file from ``save_pretrained``.
        model_name: required for a bare state dict; for a training checkpoint it must match if given.
        model_kwargs: overrides for a bare state dict (e.g. ``img_size``); ignored for training checkpoints.

    Raises:
        CheckpointError: unreadable file, or a checkpoint for another model.
    """
    path = Path(path)
    _check_file(path, "check the path")
    obj = _torch_load(path) if path.suffix != ".safetensors" else None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _verify(obj, path, _MODEL_ENTRIES)
        name = obj["model_name"]
        if model_name is not None and model_name != name:
            raise CheckpointError(
                f"{path} holds a {name} model, not {model_name}; drop --model or pass the matching checkpoint"
            )
        if model_kwargs:
            log.warning(
                "model overrides %s ignored: %s records the model's own settings", dict(model_kwargs), path
            )
        model = _build(name, int(obj["num_classes"]), obj["model_kwargs"])
        try:
            load_pretrained(model, obj["model"])
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        info = CheckpointInfo(
            name,
            dict(obj["model_kwargs"]),
            int(obj["num_classes"]),
            list(obj["class_names"]),
            Preprocessing.from_dict(obj["preprocessing"]),
            "train",
            int(obj["epoch"]),
            dict(obj.get("config") or {}),
        )
        return model, info
    if model_name is None:
        raise UsageError(
            f"{path} holds bare weights (official or converted) without the model's name: pass --model NAME"
        )
    try:
        state_dict = load_state_dict_file(path)
    except CorruptFileError as err:
        raise CheckpointError(str(err)) from None
    except (ValueError, OSError) as err:
        raise _read_error(path, err) from None
    num_classes = _head_size(state_dict)
    kwargs = dict(model_kwargs or {})
    model = _build(model_name, num_classes, kwargs)
    try:
        load_pretrained(model, state_dict)
    except ValueError as err:
        raise CheckpointError(f"{path} does not fit {model_name}: {err}") from None
    info = CheckpointInfo(
        model_name, kwargs, num_classes, None, default_preprocessing(model_name, model), "weights"
    )
    return model, info


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_name: str,
    overwrite: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert an official checkpoint to vig_pyg's safetensors and check that it loads back strictly.

    Args:
        src: the official ``.pth``/``.pth.tar`` (or any file :func:`load_model` reads).
        dst: the ``.safetensors`` file to write.
        model_name: the registered variant the weights are for.
        overwrite: replace an existing ``dst``.
        model_kwargs: model overrides, for weights of a non-standard configuration.

    Returns:
        ``{"model": name, "num_classes": n, "tensors": count, "path": dst}``.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise UsageError(f"the output {dst} should end in .safetensors")
    if dst.exists() and not overwrite:
        raise UsageError(f"{dst} already exists; pass --overwrite to replace it or choose another name")
    if dst.parent.exists() and not dst.parent.is_dir():
        raise UsageError(f"cannot write {dst}: {dst.parent} is a file, not a folder")
    if not dst.parent.is_dir():
        raise UsageError(f"folder {dst.parent} does not exist; create it first")
    model, info = load_model(src, model_name, model_kwargs)
    save_pretrained(model, dst)
    check = _build(model_name, info.num_classes, info.model_kwargs)
    load_pretrained(check, dst)  # strict: every key, every shape
    ours, back = model.state_dict(), check.state_dict()
    if ours.keys() != back.keys() or not all(torch.equal(ours[k], back[k]) for k in ours):
        raise RuntimeError(f"{dst} does not load back to the same weights")  # a bug, not a user error
    return {"model": model_name, "num_classes": info.num_classes, "tensors": len(ours), "path": str(dst)}
