"""``vig_pyg::knn_topk``: the selection step of the dense kNN search, as one operator.

The selection after the score matmul is the slowest step of the dense search on CPU: ``torch.topk`` runs
a general selection over every score (about 7 ns per score at ViG's sizes, 12-16% of Pyramid ViG's eval
time). ``vig_pyg/csrc/select.cpp`` bounds each row's k-th best score from the maxima of strided groups,
then sorts only the few scores above the bound (3.1x faster for Pyramid ViG's first two stages at 224,
2.0x-2.5x at 448, 1.3x-2.3x for the ``k * d`` of 18 to 45 of later stages; ``benchmarks/graph.py``).

The operator's PyTorch implementation, :func:`reference_knn_topk`, is ``torch.topk`` and serves every
device and dtype; where the compiled kernels are built (:mod:`vig_pyg.kernels`) the CPU kernel takes
float32/float64 scores for ``k <= 48``. Eager mode, ``torch.compile`` and ``torch.export`` all call the
operator, so they select with the same kernel; ONNX export decomposes it into ``torch.topk``
(:func:`vig_pyg.ops.decompositions`). Both orders equal scores differently: the kernel keeps the earlier
key first, ``torch.topk`` leaves ties unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KERNEL_MAX_K", "knn_topk", "reference_knn_topk"]

# Beyond this k the kernel's selection has no edge over torch.topk (of 196 scores: 1.3x at k = 45,
# 0.75x at k = 63, where the bound from the group maxima lets through too many candidates).
KERNEL_MAX_K = 48


def reference_knn_topk(score: Tensor, k: int) -> Tensor:
    """``torch.topk(score, k, dim=-1).indices``: positions of the ``k`` largest scores, largest first."""
    return torch.topk(score, k, dim=-1).indices


@torch.library.custom_op("vig_pyg::knn_topk", mutates_args=())
def knn_topk(score: Tensor, k: int) -> Tensor:
    """Positions (int64, ``(..., k)``) of the ``k`` largest scores along the last axis, largest first."""
    return reference_knn_topk(score, k)


@knn_topk.register_fake
def _(score: Tensor, k: int) -> Tensor:
    return score.new_empty((*score.shape[:-1], k), dtype=torch.long)


def compiled_knn_topk(score: Tensor, k: int) -> Tensor:
    """The CPU kernel: the compiled selection where it applies, ``torch.topk`` otherwise."""
    if k <= KERNEL_MAX_K and k <= score.size(-1) and score.dtype in (torch.float32, torch.float64):
        return torch.ops.vig_pyg_cpu.small_topk(score, k)
    return reference_knn_topk(score, k)
