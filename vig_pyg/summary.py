"""A model's parameters, MACs and graph blocks, as a table (what ``vig-pyg info`` shows)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vig_pyg.graph.dynamic import GridKNNGraph
from vig_pyg.layers import Grapher
from vig_pyg.models.stats import model_stats
from vig_pyg.nn import PyGConvAdapter

__all__ = ["BlockInfo", "ModelSummary", "format_summary", "model_summary"]


@dataclass(frozen=True)
class BlockInfo:
    """One Grapher at a given input size.

    Attributes:
        stage: pyramid stage (0 for an isotropic model).
        block: index among all Graphers.
        channels: node feature width.
        grid: ``(height, width)`` of the patch grid (the centre nodes).
        keys: number of key nodes each centre chooses from (after pooling).
        k: neighbours per node.
        dilation: the dilation used at this input size (the planned one, capped by the key count).
        reduce_ratio: key pooling factor.
        conv: the graph convolution's class name.
    """

    stage: int
    block: int
    channels: int
    grid: tuple[int, int]
    keys: int
    k: int
    dilation: int
    reduce_ratio: int
    conv: str


@dataclass(frozen=True)
class ModelSummary:
    """Counts and blocks of a model for one input size."""

    params: int
    params_all: int
    macs: int
    input_size: tuple[int, int, int]
    blocks: list[BlockInfo] = field(default_factory=list)


def _conv_name(conv: nn.Module) -> str:
    if isinstance(conv, PyGConvAdapter):
        return f"{type(conv.conv).__name__} (PyG)"
    return type(conv).__name__


def model_summary(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> ModelSummary:
    """Parameters, MACs (:func:`vig_pyg.model_stats`) and every Grapher's graph at ``input_size``.

    Args:
        model: a ViG model.
        input_size: ``(3, H, W)``; default: the model's planned ``img_size``.
    """
    if input_size is None:
        h, w = getattr(model, "img_size", (224, 224))
        input_size = (int(getattr(model, "in_chans", 3)), int(h), int(w))
    graphers = [(name, m) for name, m in model.named_modules() if isinstance(m, Grapher)]
    by_knn = {g.knn: (name, g) for name, g in graphers}
    seen: dict[GridKNNGraph, BlockInfo] = {}

    def hook(module: GridKNNGraph, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
        vals = list(args) + [
            kwargs.get(n) for n in ("nodes", "keys", "batch_size", "height", "width")[len(args) :]
        ]
        nodes, keys, b, h, w = vals
        name, grapher = by_knn[module]
        m = keys.size(0) // int(b)
        stage = int(match[1]) if (match := re.search(r"stages\.(\d+)\.", name)) else 0
        dilation = module.effective_dilation(m) if hasattr(module, "effective_dilation") else module.dilation
        seen[module] = BlockInfo(
            stage=stage,
            block=len(seen),
            channels=int(nodes.size(1)),
            grid=(int(h), int(w)),
            keys=m,
            k=int(module.k),
            dilation=int(dilation),
            reduce_ratio=int(module.reduce_ratio),
            conv=_conv_name(grapher.graph_conv),
        )

    handles = [g.knn.register_forward_hook(hook, with_kwargs=True) for _, g in graphers]
    try:
        stats = model_stats(model, input_size)
    finally:
        for handle in handles:
            handle.remove()
    return ModelSummary(
        stats["params"], stats["params_all"], stats["macs"], tuple(input_size), list(seen.values())
    )  # type: ignore[arg-type]


def _macs(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_summary(summary: ModelSummary, name: str = "") -> str:
    """The summary as text: a header and one table row per Grapher."""
    c, h, w = summary.input_size
    lines = [
        f"{name + ': ' if name else ''}{summary.params:,} trainable parameters"
        + (f" ({summary.params_all:,} in all)" if summary.params_all != summary.params else "")
        + f", {_macs(summary.macs)} MACs at {c}x{h}x{w}",
        "",
    ]
    header = ["stage", "block", "channels", "nodes", "keys", "k", "dilation", "reduce", "conv"]
    rows = [
        [
            str(b.stage),
            str(b.block),
            str(b.channels),
            f"{b.grid[0]}x{b.grid[1]}={b.grid[0] * b.grid[1]}",
            str(b.keys),
            str(b.k),
            str(b.dilation),
            str(b.reduce_ratio),
            b.conv,
        ]
        for b in summary.blocks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{wd}}}" if i in (3, 8) else f"{{:>{wd}}}" for i, wd in enumerate(widths))
    lines.append(fmt.format(*header).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)
