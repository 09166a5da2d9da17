"""``svga``: MobileViG's sparse vision graph, every K-th node along the row and the column (a torus)."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid, per_image

__all__ = ["SVGAGraph", "axial_neighbors"]


def axial_neighbors(height: int, width: int, shifts_h: range, shifts_w: range, device=None) -> Tensor:
    """``(H * W, len(shifts_h) + len(shifts_w))``: for every node ``(h, w)`` the nodes ``((h - s) mod H, w)``
    for ``s`` in ``shifts_h``, then ``(h, (w - s) mod W)`` for ``s`` in ``shifts_w`` (what rolling the map
    by ``s`` brings to it), in raster indices."""
    rows = torch.arange(height, device=device).view(-1, 1, 1)
    cols = torch.arange(width, device=device).view(1, -1, 1)
    sh = torch.tensor(list(shifts_h), dtype=torch.long, device=device).view(1, 1, -1)
    sw = torch.tensor(list(shifts_w), dtype=torch.long, device=device).view(1, 1, -1)
    along_h = ((rows - sh) % height) * width + cols  # (H, 1, nh) broadcast with cols: (H, W, nh)
    along_w = rows * width + (cols - sw) % width  # (H, W, nw)
    along_h = along_h.expand(height, width, sh.size(-1))
    return torch.cat([along_h, along_w], dim=-1).reshape(height * width, -1)


class SVGAGraph(GraphBuilder):
    """MobileViG's static axial graph (SVGA): every node joined to itself and to the nodes ``K, 2K, ...``
    rows above it and columns left of it, wrapping around the map.

    ``(x_i, x_i)`` is the self loop that MobileViG's zero start is: with a max-relative conv over this graph,
    ``max(0, max_j (x_i - x_j))`` is its ``MRConv4d`` (``conv="mr_concat", conv_kwargs={"sign": -1}``).
    The degree depends on the grid: ``1 + len(range(K, H, K)) + len(range(K, W, K))`` (7 at 7x7, K = 2).

    Args:
        K: the step between neighbours along an axis (MobileViG: 2).
    """

    regular = True

    def __init__(self, K: int = 2) -> None:  # K: the official argument name
        super().__init__()
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        self.K = K

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        h, w, step = grid.height, grid.width, self.K
        table = axial_neighbors(h, w, range(0, 1), range(0, 0), nodes.device)  # the node itself
        table = torch.cat(
            [table, axial_neighbors(h, w, range(step, h, step), range(step, w, step), nodes.device)], 1
        )
        return Graph.from_neighbors(per_image(table, grid.batch_size, h * w))

    def describe(self, grid: PatchGrid) -> str:
        degree = 1 + len(range(self.K, grid.height, self.K)) + len(range(self.K, grid.width, self.K))
        return f"svga K={self.K} ({degree} per node)"

    def extra_repr(self) -> str:
        return f"K={self.K}"
