"""Checkpoints: the official layout <-> vig_pyg's, file formats, pretrained loading.

The official models keep every block in one flat ``backbone`` Sequential (Pyramid ViG's downsample
layers take indices too), name BatchNorms by position, store the graph MLPs and the head as 1x1 convs
(weights ``(out, in, 1, 1)``), and carry each pyramid Grapher's relative-position term as a frozen
parameter. vig_pyg names modules by role, stores those weights as ``(out, in)`` and recomputes the
relative-position term. The conversion is a key map derived from the model's own structure plus three
explicit transforms:

1. drop the trailing ``1x1`` axes of graph-MLP and head weights (and add them back going the other way);
2. check each official ``relative_pos`` against the term vig_pyg computes, then drop it (add it back);
3. nothing else: every other tensor is copied as is, and every key on both sides must be accounted for.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from vig_pyg.files import atomic_write, state_digest
from vig_pyg.graph.builders import GridKNNGraph

__all__ = [
    "CHECKSUM_KEY",
    "CorruptFileError",
    "convert_official",
    "is_official_layout",
    "load_pretrained",
    "load_state_dict_file",
    "official_key_map",
    "save_pretrained",
    "to_official",
]

log = logging.getLogger(__name__)

#: safetensors metadata key of the SHA-256 of the tensors vig_pyg wrote (official files have none).
CHECKSUM_KEY = "vig_pyg_sha256"


class CorruptFileError(ValueError):
    """A file whose contents no longer match the checksum written with it."""


_BLOCK_RULES = [
    (r"grapher\.fc([12])\.conv\.(.+)", r"0.fc\1.0.\2"),
    (r"grapher\.fc([12])\.norm\.(.+)", r"0.fc\1.1.\2"),
    (r"grapher\.graph_conv\.(nn|nn1|nn2)\.lin\.(.+)", r"0.graph_conv.gconv.\1.0.\2"),
    (r"grapher\.graph_conv\.(nn|nn1|nn2)\.norm\.(.+)", r"0.graph_conv.gconv.\1.1.\2"),
    (r"grapher\.graph_conv\.eps", r"0.graph_conv.gconv.eps"),
    (r"ffn\.fc([12])\.conv\.(.+)", r"1.fc\1.0.\2"),
    (r"ffn\.fc([12])\.norm\.(.+)", r"1.fc\1.1.\2"),
]
_HEAD_RULES = [(r"head\.fc\.(.+)", r"prediction.0.\1"), (r"head\.norm\.(.+)", r"prediction.1.\1"),
               (r"head\.classifier\.(.+)", r"prediction.4.\1")]  # fmt: skip
_CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")


def _block_key(rest: str, flat: int) -> str | None:
    for pattern, repl in _BLOCK_RULES:
        if re.fullmatch(pattern, rest):
            return f"backbone.{flat}." + re.sub(pattern, repl, rest)
    return None


def _official_name(key: str, stage_offsets: list[int] | None) -> str | None:
    if key == "pos_embed":
        return key
    if m := re.fullmatch(r"stem\.layers\.(\d+)\.(conv|norm)\.(.+)", key):
        i, part, p = int(m[1]), m[2], m[3]
        return f"stem.convs.{3 * i + (part == 'norm')}.{p}"
    if m := re.fullmatch(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.+)", key):
        assert stage_offsets is not None
        return f"backbone.{stage_offsets[int(m[1])] - 1}.conv.{int(m[2] == 'norm')}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        assert stage_offsets is not None
        return _block_key(m[3], stage_offsets[int(m[1])] + int(m[2]))
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
        return _block_key(m[2], int(m[1]))
    for pattern, repl in _HEAD_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _stage_offsets(model: nn.Module) -> list[int] | None:
    depths = getattr(model, "depths", None)
    if depths is None:
        return None
    # Flat backbone index of each stage's first block: the downsample layers take one index each.
    return [sum(depths[:s]) + s for s in range(len(depths))]


def official_key_map(model: nn.Module) -> dict[str, str]:
    """vig_pyg key -> official key for every entry of ``model.state_dict()``."""
    offsets = _stage_offsets(model)
    mapping, orphans = {}, []
    for key in model.state_dict():
        name = _official_name(key, offsets)
        if name is None:
            orphans.append(key)
        else:
            mapping[key] = name
    if orphans:
        raise ValueError(
            "this model has parameters with no counterpart in the official layout (a graph conv other than "
            f"mr/edge/gin/sage?): {orphans[:5]}{' ...' if len(orphans) > 5 else ''}"
        )
    return mapping


_RELATIVE_POS = re.compile(r"backbone\.\d+\.0\.relative_pos")


def _relative_pos_keys(model: nn.Module) -> dict[str, GridKNNGraph]:
    """Official ``relative_pos`` key -> the kNN module holding that term, for every pyramid Grapher."""
    offsets = _stage_offsets(model)
    if offsets is None:
        return {}
    out = {}
    for s, stage in enumerate(model.stages):  # type: ignore[attr-defined]
        for j, block in enumerate(stage.blocks):
            graph = block.grapher.graph
            if getattr(graph, "relative_pos_dim", None) is not None:
                out[f"backbone.{offsets[s] + j}.0.relative_pos"] = graph
    return out


def is_official_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a state dict uses the official key layout (``backbone.*``, ``prediction.*``)."""
    return any(k.startswith(("backbone.", "prediction.", "stem.convs.")) for k in state_dict)


def _fit(value: Tensor, shape: torch.Size, key: str, source: str) -> Tensor:
    if value.shape == shape:
        return value
    if value.shape == (*shape, 1, 1):
        return value.reshape(shape)
    raise ValueError(
        f"{source} has {key} of shape {tuple(value.shape)} but this model needs {tuple(shape)}: "
        "the checkpoint is for another variant or configuration"
    )


def _missing_unexpected_error(missing: list[str], unexpected: list[str], what: str) -> ValueError:
    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [f"{what} does not match this model"]
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    parts.append("check that the checkpoint and the model name (and overrides) are the same variant")
    return ValueError("; ".join(parts))


def convert_official(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Convert an official ViG/Pyramid ViG state dict to ``model``'s layout (pure: inputs are unchanged).

    Every official key must be used and every model key provided; ``relative_pos`` entries may be absent
    (they are derived) but when present must equal the term the model computes.
    """
    mapping = official_key_map(model)
    own = model.state_dict()
    rel_keys = _relative_pos_keys(model)
    missing = [official for official in mapping.values() if official not in state_dict]
    # A block whose graph builder has no relative-position term (e.g. graph="grid") has no use for its
    # official relative_pos entry: derived, not learned, so it is left out.
    derived = _RELATIVE_POS if _stage_offsets(model) is not None else None
    unexpected = [
        k
        for k in state_dict
        if k not in set(mapping.values()) and k not in rel_keys and not (derived and derived.fullmatch(k))
    ]
    if missing or unexpected:
        raise _missing_unexpected_error(missing, unexpected, "the official checkpoint")
    for key, knn in rel_keys.items():
        if key in state_dict:
            expected = knn.rel_bias.cpu()  # the term the model computed for its planned grid
            stored = state_dict[key]
            if (
                stored.numel() != expected.numel()
                or (stored.reshape(expected.shape).float() - expected).abs().max() > 1e-4
            ):
                h, w = knn.grid_size
                raise ValueError(
                    f"{key} in the checkpoint differs from the relative-position term of this model "
                    f"({knn.relative_pos_dim} channels on a {h}x{w} grid, reduce ratio {knn.reduce_ratio}): "
                    "wrong variant or image size"
                )
    return {
        ours: _fit(state_dict[official], own[ours].shape, official, "the checkpoint")
        for ours, official in mapping.items()
    }


def convert_mapped(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An official state dict in ``model``'s layout through the model's own ``official_key_map()``: every key
    used both ways, shapes fitted (1x1 conv weights to linear ones). Classifier entries of another size than
    the model's are left out (the model keeps its fresh classifier, for fine-tuning)."""
    mapping = model.official_key_map()  # type: ignore[operator]
    own = model.state_dict()
    missing = [official for official in mapping.values() if official not in state_dict]
    unexpected = [k for k in state_dict if k not in set(mapping.values())]
    if missing or unexpected:
        raise _missing_unexpected_error(missing, unexpected, "the official checkpoint")
    out = {}
    for ours, official in mapping.items():
        value = state_dict[official]
        if ours.startswith("head.") and "classifier" in ours and value.numel() != own[ours].numel():
            log.info("classifier size differs from the checkpoint's: keeping a freshly initialised %s", ours)
            value = own[ours]
        out[ours] = _fit(value, own[ours].shape, official, "the checkpoint")
    return out


def to_official(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_official`: ``model``'s state dict in the official layout."""
    if callable(getattr(model, "official_key_map", None)):
        own = model.state_dict()
        ref = {k: v for k, v in own.items()}
        return {
            official: state_dict[ours].reshape(_official_shape(ours, ref[ours]))
            for ours, official in model.official_key_map().items()  # type: ignore[operator]
        }
    mapping = official_key_map(model)
    missing = [k for k in mapping if k not in state_dict]
    unexpected = [k for k in state_dict if k not in mapping]
    if missing or unexpected:
        raise _missing_unexpected_error(missing, unexpected, "the state dict")
    out: dict[str, Tensor] = {}
    rel = _relative_pos_keys(model)
    for ours, official in mapping.items():
        value = state_dict[ours]
        is_mlp = ".graph_conv." in ours and ours.endswith(".lin.weight")
        if is_mlp or ours in ("head.fc.weight", "head.classifier.weight"):
            value = value.reshape(*value.shape, 1, 1)
        out[official] = value
    for key, knn in rel.items():
        out[key] = knn.rel_bias.cpu().unsqueeze(0)
    # The official modules register relative_pos first in each Grapher; order the keys the same way.
    return dict(sorted(out.items(), key=lambda kv: _official_sort_key(kv[0])))


def _official_shape(key: str, value: Tensor) -> tuple[int, ...]:
    # Linear and grouped-linear weights are 1x1 convolutions in the official layouts.
    linear = key.endswith("weight") and value.dim() == 2
    return (*value.shape, 1, 1) if linear else tuple(value.shape)


def _official_sort_key(key: str) -> tuple:
    head = {"pos_embed": 0, "stem": 1, "backbone": 2, "prediction": 3}[key.split(".")[0]]
    nums = tuple(int(p) if p.isdigit() else -1 if p == "relative_pos" else 0 for p in key.split(".")[1:])
    return (head, *nums)


def load_state_dict_file(source: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint from a path or URL into a flat state dict.

    Accepts ``.safetensors`` files and ``torch.save`` files (``.pth``, ``.pth.tar``, ...) holding a state
    dict directly or under a ``state_dict``/``model``/``state_dict_ema`` key; a ``module.`` prefix (from
    DataParallel/DDP) is removed. ``torch.load`` runs with ``weights_only=True``.
    """
    src = os.fspath(source)
    if src.startswith(("http://", "https://")):
        try:
            obj = torch.hub.load_state_dict_from_url(
                src, map_location="cpu", weights_only=True, progress=False
            )
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(
                f"could not download {src} ({err}). Download the file by other means and pass its local "
                "path, e.g. create_model(name, pretrained='/path/to/file.pth')"
            ) from err
    else:
        path = Path(src)
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder, not a checkpoint file; pass the file inside it")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            if path.suffix == ".safetensors":
                obj = _load_safetensors(path)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except CorruptFileError:
            raise
        except Exception as err:  # a truncated or foreign file raises many kinds of errors
            raise ValueError(
                f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be truncated "
                "or not a PyTorch/safetensors file"
            ) from err
    return _unwrap(obj, src)


def _unwrap(obj: object, src: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{src} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> nn.Module:
    """Load a checkpoint (path, URL or state dict; official or vig_pyg layout) into ``model``, strictly.

    A classifier whose size differs from the model's is skipped (the model keeps its fresh classifier),
    so official ImageNet weights can start a fine-tuning run with another ``num_classes``.
    """
    state_dict = dict(source) if isinstance(source, Mapping) else load_state_dict_file(source)
    own = model.state_dict()
    if is_official_layout(state_dict) and callable(getattr(model, "official_key_map", None)):
        state_dict = convert_mapped(state_dict, model)  # a family that maps its own keys (MobileViG, ...)
    elif is_official_layout(state_dict):
        head_w = state_dict.get("prediction.4.weight")
        if (
            head_w is not None
            and "head.classifier.weight" in own
            and head_w.size(0) != own["head.classifier.weight"].size(0)
        ):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("prediction.4.")}
            state_dict.update(
                {
                    "prediction.4." + k.split(".")[-1]: own[k].reshape(*own[k].shape, 1, 1)
                    for k in _CLASSIFIER_KEYS
                }
            )
            log.info(
                "classifier size differs from the checkpoint's: keeping a freshly initialised classifier"
            )
        state_dict = convert_official(state_dict, model)
    else:
        w = state_dict.get("head.classifier.weight")
        if (
            w is not None
            and "head.classifier.weight" in own
            and w.shape != own["head.classifier.weight"].shape
        ):
            state_dict.update({k: own[k] for k in _CLASSIFIER_KEYS})
            log.info(
                "classifier size differs from the checkpoint's: keeping a freshly initialised classifier"
            )
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise _missing_unexpected_error(missing, unexpected, "the checkpoint")
        state_dict = {k: _fit(v, own[k].shape, k, "the checkpoint") for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        expected = (f.metadata() or {}).get(CHECKSUM_KEY)
    tensors = load_file(str(path))
    if expected is not None and state_digest(tensors) != expected:
        raise CorruptFileError(
            f"{path} is corrupt: its tensors do not match the checksum written with them; use another "
            "copy of the file (or convert the official weights again)"
        )
    return tensors


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights as safetensors, with a checksum of the tensors that loading verifies.

    Written to a temporary file, then renamed: an interrupted save leaves any earlier ``path`` intact.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"format": "pt", CHECKSUM_KEY: state_digest(tensors)})
    atomic_write(path, lambda f: f.write(data))
