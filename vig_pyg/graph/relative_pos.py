"""Pyramid ViG's relative-position term for the kNN distance.

For a Grapher with ``C`` channels on an ``H x W`` grid, the official model adds
``-R = -(2 / C) P P^T`` to the squared feature distance before ranking neighbours, where ``P`` is the
``(H W, C)`` 2-D sine-cosine position embedding (MAE style). Nearby patches thus look closer. With pooled
key nodes (reduce ratio ``r > 1``) the official code resizes ``R``'s columns with a 1-D bicubic resampling
over the flattened raster index (not a 2-D pool); we reproduce that by resampling ``P``'s rows the same
way, so the term is a product of two small factors and never needs the ``(HW, HW)`` matrix.

Everything is computed with torch ops in float64 (then cast to float32), so that tracing (``torch.export``,
``torch.compile``) can follow it; eager calls are cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vig_pyg.graph.knn import LowRankBias

__all__ = ["relative_position_bias", "relative_position_factors", "sincos_pos_embed"]


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    # Frequencies 1 / 10000^(f / (dim/2)) in float64, as the reference recipe computes them.
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed(dim: int, height: int, width: int) -> Tensor:
    """``(H * W, dim)`` float64 2-D sine-cosine embedding, raster order; ``dim`` divisible by 4.

    The first half encodes the column, the second the row (the MAE layout the checkpoints were made with).
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine position embedding needs channels divisible by 4, got {dim}")
    # Built on the CPU whatever the ambient default device (e.g. a meta-device model build): it is cached.
    rows = torch.arange(height, dtype=torch.float32, device="cpu").repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float32, device="cpu").repeat(height)
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)


def _factors(dim: int, height: int, width: int, reduce_ratio: int) -> tuple[Tensor, Tensor]:
    p = sincos_pos_embed(dim, height, width)  # (N, C) float64
    if reduce_ratio == 1:
        q = p
    else:
        num_keys = (height // reduce_ratio) * (width // reduce_ratio)
        # 1-D bicubic resampling of the node axis (the channel axis keeps its size: an identity).
        q = F.interpolate(p.t()[None, None], size=(dim, num_keys), mode="bicubic", align_corners=False)
        q = q[0, 0].t()  # (M, C)
    scale = (2.0 / dim) ** 0.5
    return p * scale, q * scale


def _bias(dim: int, height: int, width: int, reduce_ratio: int) -> Tensor:
    query, key = _factors(dim, height, width, reduce_ratio)
    return (-(query @ key.t())).float()


def relative_position_factors(
    dim: int, height: int, width: int, reduce_ratio: int = 1, device: torch.device | str | None = None
) -> LowRankBias:
    """The term as a :class:`LowRankBias` (``bias = -query @ key.T``), usable by every kNN back-end.

    Computed on every call (a pure function of the sizes, so ``torch.compile`` and ``torch.export`` trace
    it): modules keep it for their planned grid (:class:`~vig_pyg.graph.GridKNNGraph`'s buffers).
    """
    query, key = _factors(dim, height, width, reduce_ratio)
    return LowRankBias(query.float().to(device), key.float().to(device))


def relative_position_bias(
    dim: int, height: int, width: int, reduce_ratio: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """The ``(H W, (H / r)(W / r))`` float32 bias matrix (values in ``[-1, 0)``), computed in float64."""
    return _bias(dim, height, width, reduce_ratio).to(device)
