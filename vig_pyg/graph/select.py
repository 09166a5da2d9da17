"""Exact top-k selection for the dense kNN search, with an optional compiled CPU kernel.

The selection after the score matmul is the slowest step of the dense search on CPU: ``torch.topk`` runs
a general selection over every score (about 7 ns per score at ViG's sizes, 12-16% of Pyramid ViG's eval
time). ``vig_pyg/csrc/select.cpp`` bounds each row's k-th best score from the maxima of strided groups,
then sorts only the few scores above the bound (3.1x faster for Pyramid ViG's first two stages at 224,
2.0x-2.5x at 448, 1.3x-2.3x for the ``k * d`` of 18 to 45 of later stages; ``benchmarks/graph.py``). It
is one of the optional compiled kernels of :mod:`vig_pyg.kernels`. Without it, or on GPU, in
float16/bfloat16, for ``k > 48``, or while ``torch.compile``/``torch.export`` capture the model,
:func:`topk_indices` is ``torch.topk``: the results are the same either way (up to the order of exactly
equal scores, which ``torch.topk`` leaves unspecified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg import kernels

__all__ = ["KERNEL_MAX_K", "topk_indices"]

# Beyond this k the kernel's selection has no edge over torch.topk (of 196 scores: 1.3x at k = 45,
# 0.75x at k = 63, where the bound from the group maxima lets through too many candidates).
KERNEL_MAX_K = 48


def topk_indices(score: Tensor, k: int) -> Tensor:
    """``torch.topk(score, k, dim=-1).indices`` (largest first), by the compiled kernel where it applies."""
    if k <= KERNEL_MAX_K and kernels.usable(score):
        return torch.ops.vig_pyg.small_topk(score, k)
    return torch.topk(score, k, dim=-1).indices
