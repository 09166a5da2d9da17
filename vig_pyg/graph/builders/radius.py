"""``radius``: every node joined to the nodes within a distance of it in feature space (variable degree)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid
from vig_pyg.ops.ragged import masked_edges
from vig_pyg.ops.select import knn_topk

__all__ = ["RadiusGraph"]


class RadiusGraph(GraphBuilder):
    """Every node joined to the key nodes of its image within distance ``r`` (L2-normalised features, as
    ViG's kNN measures them, so ``0 <= r <= 2``), at most ``max_num_neighbors`` of them, the nearest.

    The degree varies from node to node: a ragged :class:`~vig_pyg.graph.Graph`, which every conv
    aggregates through PyG's scatter. Every node keeps at least its nearest key node, within ``r`` or not:
    without pooled keys that is the node itself; with them (``reduce_ratio > 1``) a node far from every
    pooled key would otherwise have no neighbour at all, and a max over nothing.

    The search is one dense similarity matrix per image and a top-``max_num_neighbors``: at ViG's feature
    widths (48 to 640 channels) a space-partitioning search such as torch_cluster's ``radius`` prunes
    nothing. The data-dependent edge count is the operator ``vig_pyg::masked_edges``, so compiled
    models capture the graph without a break.

    Args:
        r: the radius.
        max_num_neighbors: the cap on the degree.
        reduce_ratio: the key nodes are the grid average-pooled by this factor.
    """

    def __init__(self, r: float = 1.0, max_num_neighbors: int = 16, reduce_ratio: int = 1) -> None:
        super().__init__(reduce_ratio)
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 2:
            raise ValueError(f"r must be a distance between 0 and 2 (normalised features), got {r!r}")
        if (
            isinstance(max_num_neighbors, bool)
            or not isinstance(max_num_neighbors, int)
            or max_num_neighbors < 1
        ):
            raise ValueError(f"max_num_neighbors must be a positive int, got {max_num_neighbors!r}")
        self.r, self.max_num_neighbors = float(r), max_num_neighbors

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        keys = self.key_nodes(nodes, grid)
        b = grid.batch_size
        m = keys.size(0) // b
        cap = min(self.max_num_neighbors, m)
        with torch.no_grad():
            x = F.normalize(nodes, dim=-1).view(b, grid.num_nodes, -1)
            y = F.normalize(keys, dim=-1).view(b, m, -1) if keys is not nodes else x
            similarity = torch.bmm(x, y.transpose(1, 2))  # (B, N, M); |x - y|^2 = 2 - 2 x.y
            local = knn_topk(similarity, cap)  # (B, N, cap), nearest first (the kNN's selection kernel)
            nearest = similarity.gather(-1, local)
            keep = nearest >= 1 - self.r**2 / 2
            keep[..., 0] = True  # the nearest key: a node's own (distance 0, up to rounding), or a pooled one
            offsets = torch.arange(b, device=nodes.device).view(-1, 1, 1) * m
            edge_index = masked_edges((local + offsets).view(-1, cap), keep.view(-1, cap))
        return Graph(edge_index, keys if keys is not nodes else None)

    def describe(self, grid: PatchGrid) -> str:
        return f"radius r={self.r:g} max={self.max_num_neighbors}"

    def extra_repr(self) -> str:
        r = f", reduce_ratio={self.reduce_ratio}" if self.reduce_ratio > 1 else ""
        return f"r={self.r:g}, max_num_neighbors={self.max_num_neighbors}{r}"
