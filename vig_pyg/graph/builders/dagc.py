"""``dagc``: GreedyViG's dynamic axial graph, the axial neighbours nearer than the image's mean minus std."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.graph.bridge import nodes_to_image
from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid, per_image
from vig_pyg.graph.builders.svga import axial_neighbors

__all__ = ["DAGCGraph"]


class DAGCGraph(GraphBuilder):
    """GreedyViG's per-image thresholded axial graph (DAGC).

    Candidates are the nodes ``0, K, 2K, ...`` rows above and columns left of each node, wrapping around
    (shift 0 is the node itself). A candidate is kept when its L1 distance to the node (over channels) is
    below the image's threshold ``mean - std`` of the L1 distances between every node and the node half the
    map away on both axes (shifted by ``ceil(H/2), ceil(W/2)``; ``std`` unbiased). A dropped candidate is
    replaced by the node itself, so the graph stays k-regular: under a max-relative aggregation a self edge
    adds ``x_i - x_i = 0``, which is GreedyViG's zero start, and the result is exactly its
    ``DynamicMRConv4d`` (``conv="mr_concat"``).

    Args:
        K: the step between candidates along an axis (GreedyViG: 8, 4, 2, 1 by stage).
    """

    regular = True

    def __init__(self, K: int = 2) -> None:  # K: the official argument name
        super().__init__()
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        self.K = K

    def threshold(self, nodes: Tensor, grid: PatchGrid) -> Tensor:
        """``(B,)`` each image's ``mean - std`` of the half-map L1 distances."""
        x = nodes_to_image(nodes, *grid)  # (B, C, H, W)
        rolled = torch.roll(x, (-(-grid.height // 2), -(-grid.width // 2)), dims=(2, 3))
        dist = (x - rolled).abs().sum(1).flatten(1)  # (B, H * W)
        return dist.mean(1) - dist.std(1)

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        b, h, w = grid
        n = h * w
        with torch.no_grad():
            table = per_image(
                axial_neighbors(h, w, range(0, h, self.K), range(0, w, self.K), nodes.device), b, n
            )  # (B * N, k)
            dist = (nodes.unsqueeze(1) - nodes[table]).abs().sum(-1)  # (B * N, k) L1
            keep = dist < self.threshold(nodes, grid).repeat_interleave(n).unsqueeze(1)
            own = torch.arange(b * n, device=nodes.device).unsqueeze(1)
            table = torch.where(keep, table, own)
        return Graph.from_neighbors(table)

    def describe(self, grid: PatchGrid) -> str:
        degree = len(range(0, grid.height, self.K)) + len(range(0, grid.width, self.K))
        return f"dagc K={self.K} (<= {degree} per node)"

    def extra_repr(self) -> str:
        return f"K={self.K}"
