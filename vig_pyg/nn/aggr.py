"""Aggregation for k-regular graphs.

A kNN graph gives every target node exactly ``k`` incoming edges; sorted by target (as
:func:`vig_pyg.graph.knn_graph` returns them) its messages are an ``(N, k, C)`` view, and aggregation is a
reduction over the ``k`` axis. On CPU that measured 1.3x to 1.7x faster than scatter-based max at ViG's
sizes. Graphs that are not k-regular go through PyG's general aggregation instead.

The max is taken in blocks of rows: the whole ``(N, k, C)`` neighbour tensor of Pyramid ViG's first stage
(batch 8: 25,088 nodes x 9 x 80 channels, 72 MB) is a fresh allocation paid in page faults and streamed
through memory twice, while a block of about 2.4 MB stays in cache; blocked, the same gather and max
measured 4x to 5x faster on CPU at the first two stages' sizes (``benchmarks/graph.py``). With the
compiled kernels of :mod:`vig_pyg.kernels`, CPU reduces every row straight from the source rows instead,
without the intermediate (a further 2x, and 4x to 8x when the winners' positions are wanted). Both are
CPU kernels of the operator ``vig_pyg::neighbor_max`` (:mod:`vig_pyg.ops.aggregate`).
"""

from __future__ import annotations

from torch import Tensor

from vig_pyg import ops
from vig_pyg.ops import MAX_K_POSITIONS

__all__ = ["MAX_K_POSITIONS", "gather_max", "gather_neighbors"]


def gather_neighbors(x_src: Tensor, edge_index: Tensor, k: int) -> Tensor:
    """``(N_dst, k, C)`` source features of every target's ``k`` edges (target-sorted ``edge_index``)."""
    return x_src.index_select(0, edge_index[0]).view(-1, k, x_src.size(-1))


def gather_max(x_src: Tensor, edge_index: Tensor, k: int) -> Tensor:
    """``(N_dst, C)`` channel-wise max over each target's ``k`` sources (target-sorted ``edge_index``).

    For training, only the edge indices and the ``(N, C)`` positions of the winners (one byte each) are
    kept for backward (the operator's autograd formula), not the ``(N, k, C)`` neighbour tensor that
    autograd would keep for ``amax``; the gradient of every max goes to the first neighbour reaching it.
    """
    if k <= MAX_K_POSITIONS:  # positions (for backward) only where a gradient can flow to x_src
        return ops.neighbor_max(x_src, edge_index[0], k, x_src.requires_grad)[0]
    return gather_neighbors(x_src, edge_index, k).amax(dim=1)
