"""A model's parameters, MACs and graph blocks, as a table (what ``vig-pyg info`` shows)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vig_pyg.graph.builders import Graph, GraphBuilder, GridKNNGraph, PatchGrid
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
        keys: number of source nodes per image (after pooling).
        k: neighbours per node of a k-regular graph, ``None`` for a ragged one.
        degree: mean edges per node (``k`` for a k-regular graph; measured on the probe input otherwise).
        dilation: the kNN dilation used at this input size (``None`` for builders without one).
        reduce_ratio: key pooling factor.
        graph: the builder's settings at this size (its ``describe``).
        conv: the graph convolution's class name.
    """

    stage: int
    block: int
    channels: int
    grid: tuple[int, int]
    keys: int
    k: int | None
    degree: float
    dilation: int | None
    reduce_ratio: int
    graph: str
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
    by_builder = {g.graph: (name, g) for name, g in graphers}
    seen: dict[GraphBuilder, BlockInfo] = {}

    def hook(module: GraphBuilder, args: tuple, kwargs: dict[str, Any], out: Graph) -> None:
        nodes, grid = (list(args) + [kwargs.get(n) for n in ("nodes", "grid")[len(args) :]])[:2]
        grid = PatchGrid(*grid)
        name, grapher = by_builder[module]
        kh, kw = module.key_grid(grid.height, grid.width)
        stage = int(match[1]) if (match := re.search(r"stages\.(\d+)\.", name)) else 0
        dilation = module.effective_dilation(kh * kw) if isinstance(module, GridKNNGraph) else None
        seen[module] = BlockInfo(
            stage=stage,
            block=len(seen),
            channels=int(nodes.size(1)),
            grid=(grid.height, grid.width),
            keys=kh * kw,
            k=out.k,
            degree=out.num_edges / nodes.size(0),
            dilation=dilation,
            reduce_ratio=int(module.reduce_ratio),
            graph=module.describe(grid),
            conv=_conv_name(grapher.graph_conv),
        )

    handles = [g.graph.register_forward_hook(hook, with_kwargs=True) for _, g in graphers]
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
    header = ["stage", "block", "channels", "nodes", "keys", "reduce", "edges/node", "conv", "graph"]
    rows = [
        [
            str(b.stage),
            str(b.block),
            str(b.channels),
            f"{b.grid[0]}x{b.grid[1]}={b.grid[0] * b.grid[1]}",
            str(b.keys),
            str(b.reduce_ratio),
            str(b.k) if b.k is not None else f"{b.degree:.2f}",
            b.conv,
            b.graph,
        ]
        for b in summary.blocks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{wd}}}" if i in (3, 7, 8) else f"{{:>{wd}}}" for i, wd in enumerate(widths))
    lines.append(fmt.format(*header).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)
