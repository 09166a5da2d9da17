"""Model registry: ``create_model``, ``list_models`` and the official pretrained weights."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "PRETRAINED",
    "PretrainedCfg",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "register_model",
]

_RELEASES = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download"
# The MobileViG authors' Hugging Face repository; file names follow its pattern (MobileViG_S_78_2.pth.tar).
_MOBILEVIG = "https://huggingface.co/SLDGroup/MobileViG/resolve/main"
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@dataclass(frozen=True)
class PretrainedCfg:
    """Where the official weights of a variant live and the preprocessing they expect."""

    url: str
    top1: float  # ImageNet-1k top-1 reported by the authors
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000


#: The official weights of each variant, keyed by its short name (``"vig_ti"`` ... ``"pvig_b"``), with
#: the download URL, the reported top-1 and the preprocessing. File names as the release pages and
#: third-party converters name them (spec section 6).
PRETRAINED: dict[str, PretrainedCfg] = {
    "vig_ti": PretrainedCfg(f"{_RELEASES}/vig/vig_ti_74.5.pth", 73.9),
    "vig_s": PretrainedCfg(f"{_RELEASES}/vig/vig_s_80.6.pth", 80.4),
    "vig_b": PretrainedCfg(f"{_RELEASES}/vig/vig_b_82.6.pth", 82.3),
    "pvig_ti": PretrainedCfg(f"{_RELEASES}/pyramid-vig/pvig_ti_78.5.pth.tar", 78.5),
    "pvig_s": PretrainedCfg(f"{_RELEASES}/pyramid-vig/pvig_s_82.1.pth.tar", 82.1),
    "pvig_m": PretrainedCfg(f"{_RELEASES}/pyramid-vig/pvig_m_83.1.pth.tar", 83.1),
    "pvig_b": PretrainedCfg(f"{_RELEASES}/pyramid-vig/pvig_b_83.66.pth.tar", 83.66, crop_pct=0.95),
    "mobilevig_ti": PretrainedCfg(f"{_MOBILEVIG}/MobileViG_Ti_75_7.pth.tar", 75.7, **_IMAGENET),
    "mobilevig_s": PretrainedCfg(f"{_MOBILEVIG}/MobileViG_S_78_2.pth.tar", 78.2, **_IMAGENET),
    "mobilevig_m": PretrainedCfg(f"{_MOBILEVIG}/MobileViG_M_80_6.pth.tar", 80.6, **_IMAGENET),
    "mobilevig_b": PretrainedCfg(f"{_MOBILEVIG}/MobileViG_B_82_6.pth.tar", 82.6, **_IMAGENET),
}


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., nn.Module]
    model_cls: type[nn.Module]
    pretrained: str | None
    test: bool


_MODELS: dict[str, _Entry] = {}


def register_model(model_cls: type[nn.Module], pretrained: str | None = None, test: bool = False) -> Callable:
    """Register a variant function (building a ``model_cls``) under its name.

    ``pretrained`` names its :data:`PRETRAINED` entry; ``test`` marks tiny variants for tests.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[fn.__name__] = _Entry(fn, model_cls, pretrained, test)
        return fn

    return wrap


def list_models(pattern: str = "*", pretrained: bool = False, include_test: bool = True) -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted.

    Args:
        pattern: e.g. ``"pvig_*"``.
        pretrained: only variants with official weights.
        include_test: include the tiny test variants (``vig_test``, ``pvig_test``).
    """
    return sorted(
        name
        for name, e in _MODELS.items()
        if fnmatch.fnmatch(name, pattern)
        and (e.pretrained or not pretrained)
        and (include_test or not e.test)
    )


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _MODELS[name]


def get_pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The official weights' configuration of a registered model, or ``None``."""
    key = _entry(name).pretrained
    return PRETRAINED[key] if key else None


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int = 1000,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered ViG model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"pvig_s_224_gelu"``.
        pretrained: ``True`` for the official weights (downloaded through torch.hub's cache), or a local
            path or URL of a checkpoint in the official layout or vig_pyg's own (``.pth``, ``.pth.tar``,
            ``.safetensors``). A classifier of another size than ``num_classes`` is left freshly
            initialised (fine-tuning).
        num_classes: classifier outputs (0: no classifier; ``forward`` returns the head's pre-logits,
            ``head_hidden`` wide).
        features_only: return a module whose forward gives the feature maps of ``out_indices``.
        out_indices: feature levels for ``features_only`` (default: the four stages of a pyramid model,
            the last three blocks of an isotropic one).
        **overrides: model arguments, e.g. ``channels``, ``blocks``, ``k``, ``conv``, ``drop_path_rate``,
            ``img_size``, ``knn_method``.
    """
    entry = _entry(name)
    accepted = set(inspect.signature(entry.model_cls.__init__).parameters) - {"self", "num_classes"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name}; accepted: {', '.join(sorted(accepted))}")
    model = entry.fn(num_classes=num_classes, **overrides)
    if pretrained:
        from vig_pyg.models.checkpoint import load_pretrained

        source = PRETRAINED[entry.pretrained].url if pretrained is True and entry.pretrained else pretrained
        if source is True:
            raise ValueError(f"{name} has no official weights; pass a checkpoint path as pretrained=")
        load_pretrained(model, source)
    if features_only:
        from vig_pyg.models.base import FeatureExtractor

        return FeatureExtractor(model, out_indices if out_indices is not None else model.default_out_indices)
    return model
