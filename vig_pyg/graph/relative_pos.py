"""Pyramid ViG's relative-position term for the kNN distance.

For a Grapher with ``C`` channels on an ``H x W`` grid, the official model adds
``-R = -(2 / C) P P^T`` to the squared feature distance before ranking neighbours, where ``P`` is the
``(H W, C)`` 2-D sine-cosine position embedding (MAE style). Nearby patches thus look closer. With pooled
key nodes (reduce ratio ``r > 1``) the official code resizes ``R``'s columns with a 1-D bicubic resampling
over the flattened raster index (not a 2-D pool); we reproduce that by resampling ``P``'s rows the same
way, so the term is a product of two small factors and never needs the ``(HW, HW)`` matrix.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vig_pyg.graph.knn import LowRankBias

__all__ = ["relative_position_bias", "relative_position_factors", "sincos_pos_embed"]


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    # Frequencies 1 / 10000^(f / (dim/2)) in float64, as the reference recipe computes them.
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions, omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, height: int, width: int) -> np.ndarray:
    """``(H * W, dim)`` float64 2-D sine-cosine embedding, raster order; ``dim`` divisible by 4.

    The first half encodes the column, the second the row (the MAE layout the checkpoints were made with).
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine position embedding needs channels divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.concatenate(
        [_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], axis=1
    )


@functools.lru_cache(maxsize=128)
def _factors(dim: int, height: int, width: int, reduce_ratio: int) -> tuple[Tensor, Tensor]:
    p = torch.from_numpy(sincos_pos_embed(dim, height, width))  # (N, C) float64
    if reduce_ratio == 1:
        q = p
    else:
        num_keys = (height // reduce_ratio) * (width // reduce_ratio)
        # 1-D bicubic resampling of the node axis (the channel axis keeps its size: an identity).
        q = F.interpolate(p.t()[None, None], size=(dim, num_keys), mode="bicubic", align_corners=False)
        q = q[0, 0].t().contiguous()  # (M, C)
    scale = (2.0 / dim) ** 0.5
    return p * scale, q * scale


def relative_position_factors(
    dim: int, height: int, width: int, reduce_ratio: int = 1, device: torch.device | str | None = None
) -> LowRankBias:
    """The term as a :class:`LowRankBias` (``bias = -query @ key.T``), usable by every kNN back-end."""
    query, key = _factors(dim, height, width, reduce_ratio)
    return LowRankBias(query.float().to(device), key.float().to(device))


@functools.lru_cache(maxsize=128)
def _bias(dim: int, height: int, width: int, reduce_ratio: int) -> Tensor:
    query, key = _factors(dim, height, width, reduce_ratio)
    # numpy keeps this one-off table out of FLOP counters hooked into torch.
    return torch.from_numpy(-(query.numpy() @ key.numpy().T)).float()


def relative_position_bias(
    dim: int, height: int, width: int, reduce_ratio: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """The ``(H W, (H / r)(W / r))`` float32 bias matrix (values in ``[-1, 0)``), computed in float64."""
    return _bias(dim, height, width, reduce_ratio).to(device)
