"""``grid``: a static graph, every patch joined to the ``k`` patches nearest to it on the image grid."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid, per_image

__all__ = ["GridGraph", "nearest_on_grid"]


def nearest_on_grid(
    height: int, width: int, k: int, reduce_ratio: int = 1, device: torch.device | None = None
) -> Tensor:
    """``(H * W, k)`` the ``k`` key positions nearest to every node of an ``H x W`` grid, nearest first.

    The keys are the grid itself, or the cells of its ``reduce_ratio``-pooled grid (at their centres).
    Distances are squared Euclidean in patch units; equal distances go to the lower key index, so the
    table is the same on every machine.
    """
    r = reduce_ratio
    kh, kw = (height // r, width // r) if r > 1 else (height, width)
    if kh * kw < k:
        raise ValueError(f"a {kh}x{kw} key grid has fewer than k={k} nodes; lower k or use a larger input")
    rows = torch.arange(height, dtype=torch.float64, device=device)
    cols = torch.arange(width, dtype=torch.float64, device=device)
    key_rows = torch.arange(kh, dtype=torch.float64, device=device) * r + (r - 1) / 2
    key_cols = torch.arange(kw, dtype=torch.float64, device=device) * r + (r - 1) / 2
    dy = (rows.view(-1, 1, 1, 1) - key_rows.view(1, 1, -1, 1)).square()  # (H, 1, kh, 1)
    dx = (cols.view(1, -1, 1, 1) - key_cols.view(1, 1, 1, -1)).square()  # (1, W, 1, kw)
    dist = (dy + dx).reshape(height * width, kh * kw)
    # Distances are multiples of 1/4: adding index / (8 * keys) < 1/8 breaks ties by index, exactly.
    order = dist + torch.arange(kh * kw, dtype=torch.float64, device=device) / (8 * kh * kw)
    return order.topk(k, dim=1, largest=False).indices


class GridGraph(GraphBuilder):
    """Every node joined to the ``k`` key nodes nearest to it by grid position (itself first).

    The graph does not depend on the features: the same for every image and every forward pass, a
    local neighbourhood like a convolution's (the ablation that separates "a graph" from "a feature
    graph"). For the planned ``grid_size`` the table is precomputed (a non-persistent buffer).

    Args:
        k: neighbours per node.
        reduce_ratio: the key nodes are the grid average-pooled by this factor (distances to the cells'
            centres).
        grid_size: the ``(H, W)`` the model is planned for.
        edge_attr: give every edge the offset ``(dy, dx)`` from its target to its source (patch units),
            as ``edge_attr`` for convs that take edge features (``conv="gat"`` with
            ``conv_kwargs={"edge_dim": 2}``, for one).
    """

    regular = True

    def __init__(
        self,
        k: int = 9,
        reduce_ratio: int = 1,
        grid_size: tuple[int, int] | None = None,
        edge_attr: bool = False,
    ) -> None:
        super().__init__(reduce_ratio)
        self.edge_attr = bool(edge_attr)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        table = None
        if self.grid_size is not None and self.min_keys <= self._num_keys(*self.grid_size):
            table = nearest_on_grid(*self.grid_size, k, reduce_ratio)
        self.register_buffer("table", table, persistent=False)

    def _num_keys(self, height: int, width: int) -> int:
        kh, kw = self.key_grid(height, width)
        return kh * kw

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        keys = self.key_nodes(nodes, grid)
        if (grid.height, grid.width) == self.grid_size and self.table is not None:
            table = self.table
        else:
            table = nearest_on_grid(grid.height, grid.width, self.k, self.reduce_ratio, nodes.device)
        nbr = per_image(table, grid.batch_size, self._num_keys(grid.height, grid.width))
        offsets = self._offsets(table, grid, nodes) if self.edge_attr else None
        return Graph.from_neighbors(nbr, keys if keys is not nodes else None, offsets)

    def _offsets(self, table: Tensor, grid: PatchGrid, nodes: Tensor) -> Tensor:
        """``(B * N * k, 2)`` ``(dy, dx)`` from every edge's target to its source (a key cell's centre)."""
        r = self.reduce_ratio
        _, kw = self.key_grid(grid.height, grid.width)
        pos = grid.positions(nodes.device).to(nodes.dtype)  # (N, 2) targets
        key_pos = (
            torch.stack([table // kw, table % kw], dim=-1).to(nodes.dtype) * r + (r - 1) / 2
        )  # (N, k, 2)
        per_edge = (key_pos - pos.unsqueeze(1)).reshape(-1, 2)
        return per_edge.repeat(grid.batch_size, 1)

    def describe(self, grid: PatchGrid) -> str:
        return f"grid k={self.k}"

    def extra_repr(self) -> str:
        r = f", reduce_ratio={self.reduce_ratio}" if self.reduce_ratio > 1 else ""
        e = ", edge_attr=True" if self.edge_attr else ""
        return f"k={self.k}{r}{e}"
