"""How well separated a model's kNN decisions are on an input: what makes a comparison test deterministic.

A random ViG is chaotic: when two candidate neighbours of a node are nearly equally far, rounding (another
GEMM kernel, another thread count, another CPU) decides which one is kept, and a different neighbour moves
everything after it. A test that compares two implementations is only decided by the implementations
when every kNN decision on its input is separated by much more than float32 rounding. ``knn_margin``
measures that in float64: for every graph block and node, the smallest gap between the squared distances
(plus Pyramid ViG's relative-position term) of the two candidates at a rank where the kept neighbour set
would change if they swapped.

Which swaps matter: the block keeps sorted positions ``0, d, 2d, ..., (k-1)d`` of each node's candidates.
Swapping ranks ``r`` and ``r + 1`` changes the kept *set* only when exactly one of them is kept; every
aggregation of ViG's convs (max, sum) is symmetric, so the order inside the set does not matter to a
model (``ordered=True`` also counts swaps of two kept ranks, for tests that compare edge lists in order).
A block that keeps every key node (``k * d == keys``, ``d == 1``) has no decision: its margin is ``inf``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.graph import GridKNNGraph
from vig_pyg.graph.relative_pos import relative_position_bias

__all__ = [
    "MIN_MARGIN",
    "assert_well_separated",
    "block_node_margins",
    "decision_ranks",
    "knn_margin",
    "node_margins",
    "rank_margins",
]

#: float32 distances of normalised features are exact to about 1e-6; well separated means 30x that.
MIN_MARGIN = 3e-5


def decision_ranks(k: int, dilation: int, num_keys: int, ordered: bool = False) -> Tensor:
    """Ranks ``r`` (gap between sorted candidates ``r`` and ``r + 1``) whose swap changes the kept set.

    ``ordered=True``: also the swaps that only reorder the kept list (both ranks kept).
    """
    kept = torch.zeros(num_keys, dtype=torch.bool)
    kept[torch.arange(0, k * dilation, dilation)] = True
    left, right = kept[:-1], kept[1:]
    matters = (left | right) if ordered else (left ^ right)
    return matters.nonzero().flatten()


def rank_margins(dist: Tensor, k: int, dilation: int, ordered: bool = False) -> Tensor:
    """Per query, the smallest decision gap of ``dist`` (``(..., M)`` distances, any order; ``inf``: none)."""
    ranks = decision_ranks(k, dilation, dist.size(-1), ordered)
    if ranks.numel() == 0:
        return dist.new_full(dist.shape[:-1], math.inf)
    ranked = dist.sort(dim=-1).values
    gaps = ranked[..., 1:] - ranked[..., :-1]  # gap between rank r and r + 1
    return gaps[..., ranks].amin(-1)


def block_node_margins(
    knn: GridKNNGraph, nodes: Tensor, keys: Tensor, batch_size: int, height: int, width: int
) -> Tensor:
    """``(B * H * W,)`` float64 decision margin of every query node of one block, from the block's inputs.

    The distance is the one :class:`GridKNNGraph` ranks by: squared distance of the L2-normalised
    features (keys: the average-pooled nodes when ``reduce_ratio > 1``) plus the relative-position term.
    """
    b, n = int(batch_size), int(height) * int(width)
    m = keys.size(0) // b
    x = F.normalize(nodes.detach().double(), dim=-1).reshape(b, n, -1)
    y = F.normalize(keys.detach().double(), dim=-1).reshape(b, m, -1)
    dist = (x * x).sum(-1, keepdim=True) - 2 * x @ y.transpose(1, 2) + (y * y).sum(-1).unsqueeze(1)
    if knn.relative_pos_dim is not None:
        bias = relative_position_bias(knn.relative_pos_dim, int(height), int(width), knn.reduce_ratio)
        dist = dist + bias.double()
    return rank_margins(dist, knn.k, knn.effective_dilation(m)).reshape(-1)


_ARG_NAMES = ("nodes", "grid")


def node_margins(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Per-node margins (``(B * H * W,)`` float64) of every graph block of ``model`` on ``x``, in call order.

    Runs one forward pass in the model's current mode, without side effects: a training-mode model runs
    as a copy (its BatchNorm statistics stay untouched) and the global RNG state is restored. Stochastic
    dilation in training has no fixed decision to measure and is refused.
    """
    if model.training:
        if any(isinstance(m, GridKNNGraph) and m.stochastic for m in model.modules()):
            raise ValueError("stochastic dilation in training mode has random kNN decisions: no margin")
        model = copy.deepcopy(model)
    margins: list[Tensor] = []

    def hook(knn: GridKNNGraph, args: tuple, kwargs: dict) -> None:
        nodes, grid = list(args) + [kwargs[name] for name in _ARG_NAMES[len(args) :]]
        margins.append(block_node_margins(knn, nodes, knn.key_nodes(nodes, grid), *grid))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, GridKNNGraph)
    ]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not margins:
        raise ValueError("the model has no GridKNNGraph module: nothing to measure")
    return margins


def knn_margin(model: nn.Module, x: Tensor) -> float:
    """The smallest kNN decision gap of ``model`` on ``x`` over every block and node (``inf``: none)."""
    return min(float(m.min()) if m.numel() else math.inf for m in node_margins(model, x))


def assert_well_separated(model: nn.Module, x: Tensor, min_margin: float = MIN_MARGIN) -> float:
    """Fail (deterministically, on every machine) when ``x`` leaves a kNN decision of ``model`` to rounding.

    Returns the margin.
    """
    margin = knn_margin(model, x)
    assert margin >= min_margin, (
        f"kNN decisions on this input are separated by only {margin:.2e} (< {min_margin:.0e}): rounding "
        "would decide the comparison; choose another input"
    )
    return margin


def separated_input(
    model: nn.Module, shape: tuple[int, ...], min_margin: float = MIN_MARGIN, tries: int = 32
) -> Tensor:
    """A standard-normal input of ``shape`` whose kNN decisions on ``model`` are all well separated.

    Draws from seeds ``0, 1, ...`` in turn (the same input on every machine and in every test order) and
    returns the first one whose margin is at least ``min_margin``; fails when none of ``tries`` is.
    """
    best = 0.0
    for seed in range(tries):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        margin = knn_margin(model, x)
        if margin >= min_margin:
            return x
        best = max(best, margin)
    raise AssertionError(
        f"no input of shape {tuple(shape)} among {tries} seeds separates every kNN decision by "
        f"{min_margin:.0e} (best {best:.2e}): use a smaller input or batch"
    )
