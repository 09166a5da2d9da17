"""Aggregation for k-regular graphs.

A kNN graph gives every target node exactly ``k`` incoming edges; sorted by target (as
:func:`vig_pyg.graph.knn_graph` returns them) its messages are an ``(N, k, C)`` view, and aggregation is a
reduction over the ``k`` axis. On CPU that measured 1.3x to 1.7x faster than scatter-based max at ViG's
sizes. Graphs that are not k-regular go through PyG's general aggregation instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["check_k_regular", "gather_max", "gather_neighbors"]


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


class _GatherMax(torch.autograd.Function):
    """``max_j x_src[index[i, j]]`` whose backward re-gathers instead of keeping ``(N, k, C)`` alive."""

    @staticmethod
    def forward(ctx, x_src: Tensor, index: Tensor, k: int) -> Tensor:  # type: ignore[override]
        out = x_src.index_select(0, index).view(-1, k, x_src.size(-1)).amax(dim=1)  # (N, C)
        ctx.save_for_backward(x_src, index, out)
        ctx.k = k
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x_src, index, out = ctx.saved_tensors
        gathered = x_src.index_select(0, index).view(-1, ctx.k, x_src.size(-1))  # (N, k, C), recomputed
        # Ties share the gradient evenly, as amax's own backward does.
        mask = (gathered == out.unsqueeze(1)).to(grad_out.dtype)
        grad = mask * (grad_out / mask.sum(dim=1)).unsqueeze(1)
        grad_src = torch.zeros_like(x_src).index_add_(0, index, grad.view(-1, x_src.size(-1)))
        return grad_src, None, None


def gather_max(x_src: Tensor, edge_index: Tensor, k: int) -> Tensor:
    """``(N_dst, C)`` channel-wise max over each target's ``k`` sources (target-sorted ``edge_index``).

    For training, only the indices and the ``(N, C)`` result are kept for backward; the ``(N, k, C)``
    neighbour tensor is gathered again there, which costs one gather and saves ``k`` times the memory.
    """
    if torch.is_grad_enabled() and x_src.requires_grad:
        return _GatherMax.apply(x_src, edge_index[0], k)
    return gather_neighbors(x_src, edge_index, k).amax(dim=1)
