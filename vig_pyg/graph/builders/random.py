"""``random``: a fixed random k-regular graph, the ablation that asks whether the graph matters at all."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid, per_image

__all__ = ["RandomGraph", "random_neighbors"]


def random_neighbors(num_nodes: int, num_keys: int, k: int, seed: int) -> Tensor:
    """``(num_nodes, k)`` distinct key indices per node, drawn from ``seed`` alone (CPU generator)."""
    if num_keys < k:
        raise ValueError(f"{num_keys} key nodes are fewer than k={k}; lower k or use a larger input")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_nodes, num_keys, generator=generator)
    return scores.topk(k, dim=1).indices


class RandomGraph(GraphBuilder):
    """Every node joined to ``k`` distinct key nodes of its image drawn at random, once.

    The draw depends on ``seed`` and the grid only: the same for every image, every forward pass, every
    machine and after reloading a checkpoint (nothing is saved: it is redrawn from the configuration).

    Args:
        k: neighbours per node.
        seed: the draw's seed.
        reduce_ratio: the key nodes are the grid average-pooled by this factor.
        grid_size: the ``(H, W)`` the model is planned for (precomputes the table).
    """

    regular = True

    def __init__(
        self, k: int = 9, seed: int = 0, reduce_ratio: int = 1, grid_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__(reduce_ratio)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.k, self.seed = k, seed
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        table = None
        if self.grid_size is not None and self._num_keys(*self.grid_size) >= k:
            table = self._draw(*self.grid_size)
        self.register_buffer("table", table, persistent=False)

    def _num_keys(self, height: int, width: int) -> int:
        kh, kw = self.key_grid(height, width)
        return kh * kw

    def _draw(self, height: int, width: int) -> Tensor:
        return random_neighbors(height * width, self._num_keys(height, width), self.k, self.seed)

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        keys = self.key_nodes(nodes, grid)
        if (grid.height, grid.width) == self.grid_size and self.table is not None:
            table = self.table
        else:
            table = self._draw(grid.height, grid.width).to(nodes.device)
        nbr = per_image(table, grid.batch_size, self._num_keys(grid.height, grid.width))
        return Graph.from_neighbors(nbr, keys if keys is not nodes else None)

    def describe(self, grid: PatchGrid) -> str:
        return f"random k={self.k} seed={self.seed}"

    def extra_repr(self) -> str:
        r = f", reduce_ratio={self.reduce_ratio}" if self.reduce_ratio > 1 else ""
        return f"k={self.k}, seed={self.seed}{r}"
