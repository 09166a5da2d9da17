"""Neighbour max over k-regular graphs, as operators: ``vig_pyg::neighbor_max`` and ``vig_pyg::max_relative``.

A kNN graph gives every target exactly ``k`` sources; sorted by target, ``index`` holds target ``i``'s
sources at ``index[i * k:(i + 1) * k]`` and the max over them is a reduction over an ``(N, k, C)`` view.

* ``neighbor_max(x_src, index, k, positions)``: the ``(N, C)`` channel-wise max, and with ``positions``
  the position in ``[0, k)`` of the first neighbour reaching it (uint8; an empty ``(0, C)`` tensor
  otherwise).
* ``max_relative(x_src, x_dst, index, k, positions)``: MRConv's ``(N, 2C)`` linear input, ``x_dst`` and
  ``max_j x_src[j] - x_dst`` interleaved channel by channel (the official channel order), and the same
  positions.

Their autograd formula sends the gradient of every max to the first neighbour reaching it, as
``torch.max`` with indices routes it in the official code; backward keeps only ``index`` and the winners'
positions (a byte per output value), never the ``(N, k, C)`` neighbours.

Implementations: the PyTorch one (one gather and ``amax``) serves every device and dtype and is what
``torch.export``/ONNX decompose the operators into. On CPU the compiled kernel (``csrc/aggregate.cpp``,
:mod:`vig_pyg.kernels`) reduces every row straight from the source rows; without it, CPU takes the
PyTorch reduction in cache-sized blocks of rows (4x-5x faster than one gather at the first stages' sizes,
``benchmarks/graph.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MAX_K_POSITIONS",
    "blocked_max_relative",
    "blocked_neighbor_max",
    "compiled_max_relative",
    "compiled_neighbor_max",
    "max_relative",
    "neighbor_max",
    "reference_max_relative",
    "reference_neighbor_max",
    "scatter_to_sources",
    "winner_sources",
]

# The winner of every max is kept as a byte: up to this many neighbours.
MAX_K_POSITIONS = 256

# Output elements per block of rows in the blocked CPU reduction (the block's neighbours: k times as many).
_BLOCK_ELEMENTS = 1 << 16
# Up to this many neighbour elements (16 MB in float32) one gather is faster than a loop over blocks
# (measured at Pyramid ViG's last stage: 2.3 M elements, blocks 1.4x slower; third stage: 5.6 M, 1.3x faster).
_WHOLE_MAX_ELEMENTS = 1 << 22


def _check_positions(k: int, positions: bool) -> None:
    if positions and k > MAX_K_POSITIONS:
        raise ValueError(f"winner positions are bytes: k must be at most {MAX_K_POSITIONS}, got {k}")


def _first_argmax(gathered: Tensor, best: Tensor) -> Tensor:
    """``(N, C)`` position in ``[0, k)`` of the first of ``k`` neighbours reaching ``best``, as uint8.

    ``Tensor.max(dim)`` returns the same but ran 20x slower than ``amax`` over the middle axis here.
    Instead: weight the positions that reach the max by ``k - j`` (a byte each) and take the largest.
    """
    k = gathered.size(1)
    weights = torch.arange(k, 0, -1, dtype=torch.uint8, device=gathered.device).view(1, k, 1)
    return (k - ((gathered == best.unsqueeze(1)) * weights).amax(dim=1)).to(torch.uint8)


def _no_positions(x: Tensor) -> Tensor:
    return torch.empty(0, x.size(-1), dtype=torch.uint8, device=x.device)


def interleave(x_dst: Tensor, rel: Tensor) -> Tensor:
    """``(N, 2C)`` ``[x_0, m_0, x_1, m_1, ...]``: MR's linear input in the official channel order."""
    return torch.stack([x_dst, rel], dim=-1).flatten(1)


def reference_neighbor_max(x_src: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    """The PyTorch implementation of ``neighbor_max``: one gather of the ``(N, k, C)`` neighbours."""
    _check_positions(k, positions)
    gathered = x_src.index_select(0, index).view(-1, k, x_src.size(-1))
    best = gathered.amax(dim=1)
    return best, _first_argmax(gathered, best) if positions else _no_positions(x_src)


def reference_max_relative(
    x_src: Tensor, x_dst: Tensor, index: Tensor, k: int, positions: bool
) -> tuple[Tensor, Tensor]:
    """The PyTorch implementation of ``max_relative``."""
    best, pos = reference_neighbor_max(x_src, index, k, positions)
    return interleave(x_dst, best - x_dst), pos


def blocked_neighbor_max(x_src: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    """``neighbor_max`` in cache-sized blocks of rows when the neighbours would take more than 16 MB."""
    c = x_src.size(-1)
    if index.numel() * c <= _WHOLE_MAX_ELEMENTS:
        return reference_neighbor_max(x_src, index, k, positions)
    _check_positions(k, positions)
    n = index.numel() // k
    best = x_src.new_empty(n, c)
    pos = torch.empty(n, c, dtype=torch.uint8) if positions else _no_positions(x_src)
    rows = max(1, _BLOCK_ELEMENTS // c)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        gathered = x_src.index_select(0, index[start * k : end * k]).view(end - start, k, c)
        torch.amax(gathered, dim=1, out=best[start:end])
        if positions:
            pos[start:end] = _first_argmax(gathered, best[start:end])
    return best, pos


def blocked_max_relative(
    x_src: Tensor, x_dst: Tensor, index: Tensor, k: int, positions: bool
) -> tuple[Tensor, Tensor]:
    best, pos = blocked_neighbor_max(x_src, index, k, positions)
    return interleave(x_dst, best.sub_(x_dst)), pos


def compiled_neighbor_max(x_src: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    """The compiled CPU kernel where it applies (float32/float64, ``k <= 256``), else the blocked one."""
    if k <= MAX_K_POSITIONS and x_src.dtype in (torch.float32, torch.float64):
        return torch.ops.vig_pyg_cpu.neighbor_max(x_src, index, k, positions)
    return blocked_neighbor_max(x_src, index, k, positions)


def compiled_max_relative(
    x_src: Tensor, x_dst: Tensor, index: Tensor, k: int, positions: bool
) -> tuple[Tensor, Tensor]:
    if k <= MAX_K_POSITIONS and x_src.dtype in (torch.float32, torch.float64) and x_dst.dtype == x_src.dtype:
        return torch.ops.vig_pyg_cpu.max_relative(x_src, x_dst, index, k, positions)
    return blocked_max_relative(x_src, x_dst, index, k, positions)


@torch.library.custom_op("vig_pyg::neighbor_max", mutates_args=())
def neighbor_max(x_src: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    """``(N, C)`` channel-wise max over ``x_src[index[i * k:(i + 1) * k]]`` for every target ``i``, and the
    first winner's position (uint8 ``(N, C)`` with ``positions``, else an empty ``(0, C)``)."""
    return reference_neighbor_max(x_src, index, k, positions)


@torch.library.custom_op("vig_pyg::max_relative", mutates_args=())
def max_relative(
    x_src: Tensor, x_dst: Tensor, index: Tensor, k: int, positions: bool
) -> tuple[Tensor, Tensor]:
    """MR's ``(N, 2C)`` interleaved ``[x_dst, max_j x_src[j] - x_dst]`` and the winners' positions."""
    return reference_max_relative(x_src, x_dst, index, k, positions)


@neighbor_max.register_fake
def _(x_src: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    n = index.numel() // k
    c = x_src.size(-1)
    return x_src.new_empty(n, c), x_src.new_empty(n if positions else 0, c, dtype=torch.uint8)


@max_relative.register_fake
def _(x_src: Tensor, x_dst: Tensor, index: Tensor, k: int, positions: bool) -> tuple[Tensor, Tensor]:
    n, c = x_dst.shape
    dtype = torch.promote_types(x_src.dtype, x_dst.dtype)
    return x_dst.new_empty(n, 2 * c, dtype=dtype), x_dst.new_empty(
        n if positions else 0, c, dtype=torch.uint8
    )


def winner_sources(index: Tensor, k: int, positions: Tensor) -> Tensor:
    """``(N, C)`` source row of every max, from the winners' ``positions`` in ``[0, k)``."""
    return index.view(-1, k).gather(1, positions.long())


def scatter_to_sources(grad: Tensor, sources: Tensor, num_src: int) -> Tensor:
    """``(num_src, C)`` gradient of the sources: every max's gradient added to the row that won it."""
    return grad.new_zeros(num_src, grad.size(1)).scatter_add_(0, sources, grad)


def _winners(ctx) -> Tensor:
    """Winner sources from the forward's positions, or found again from ``x_src`` where it kept none."""
    index, pos, x_src = ctx.saved_tensors
    if pos.size(0) == 0:  # the forward was not asked for positions: find the winners once more
        pos = neighbor_max(x_src, index, ctx.k, True)[1]
    return winner_sources(index, ctx.k, pos)


def _setup(ctx, inputs, output) -> None:
    x_src, index, k, positions = inputs[0], inputs[-3], inputs[-2], inputs[-1]
    pos = output[1]
    # Positions cost a byte per output value; without them backward needs x_src to find the winners.
    ctx.save_for_backward(index, pos, None if positions else x_src)
    ctx.k, ctx.num_src, ctx.src_dtype = k, x_src.size(0), x_src.dtype


def _neighbor_max_backward(ctx, grad_best: Tensor, grad_pos: Tensor | None):
    grad_src = scatter_to_sources(grad_best, _winners(ctx), ctx.num_src)
    return grad_src.to(ctx.src_dtype), None, None, None


def _max_relative_backward(ctx, grad_h: Tensor, grad_pos: Tensor | None):
    pairs = grad_h.view(grad_h.size(0), -1, 2)
    grad_rel = pairs[..., 1]
    grad_dst = pairs[..., 0] - grad_rel
    grad_src = scatter_to_sources(grad_rel, _winners(ctx), ctx.num_src)
    return grad_src.to(ctx.src_dtype), grad_dst, None, None, None


neighbor_max.register_autograd(_neighbor_max_backward, setup_context=_setup)
max_relative.register_autograd(_max_relative_backward, setup_context=_setup)
