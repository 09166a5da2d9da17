"""Aggregation for k-regular graphs.

A kNN graph gives every target node exactly ``k`` incoming edges; sorted by target (as
:func:`vig_pyg.graph.knn_graph` returns them) its messages are an ``(N, k, C)`` view, and aggregation is a
reduction over the ``k`` axis. On CPU that measured 1.3x to 1.7x faster than scatter-based max at ViG's
sizes. Graphs that are not k-regular go through PyG's general aggregation instead.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_k_regular", "gather_neighbors"]


def check_k_regular(edge_index: Tensor, num_targets: int, k: int) -> None:
    """Shape check for the promise that ``edge_index`` holds ``k`` target-sorted edges per target."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (the in-degree of every node), got {k!r}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must be (2, num_edges), got {tuple(edge_index.shape)}")
    if edge_index.size(1) != num_targets * k:
        raise ValueError(
            f"k={k} promises {num_targets * k} edges for {num_targets} target nodes, but edge_index has "
            f"{edge_index.size(1)}; pass k only for graphs from knn_graph(), or k=None for any graph"
        )


def gather_neighbors(x_src: Tensor, edge_index: Tensor, k: int) -> Tensor:
    """``(N_dst, k, C)`` source features of every target's ``k`` edges (target-sorted ``edge_index``)."""
    return x_src.index_select(0, edge_index[0]).view(-1, k, x_src.size(-1))
