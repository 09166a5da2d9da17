"""Dense, un-optimised reference implementation of the official ViG / Pyramid ViG models.

This module is the test oracle and the "dense reference" speed baseline. It was written only from the
written spec (``spec/vig_official.md``), not from the official code, and it deliberately computes the way
the official ``vig_pytorch`` code does: features in the (B, C, N, 1) layout, an (N, M) pairwise distance
matrix per image, ``topk`` over it, a batched gather of neighbour features into (B, C, N, k), and grouped
(groups=4) 1x1 ``Conv2d`` + ``BatchNorm2d`` + ``GELU`` MLPs. Never tune it for speed: its value lies in
being a faithful copy of the official computation.

Module and attribute names mirror the official ones, so ``state_dict()`` keys and shapes are exactly the
official layout and released checkpoints load with ``load_state_dict(sd, strict=True)``.

Public API:

* :func:`build_reference` and :data:`REFERENCE_VARIANTS` (the 7 official variant configurations).
* :class:`IsotropicViG` and :class:`PyramidViG`, whose ``forward`` returns logits and whose
  ``forward_debug`` also returns the per-stage outputs and every Grapher's kNN indices.
* :func:`relative_pos_bias`, the pyramid Grapher's frozen distance bias (spec section 3.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FFN",
    "REFERENCE_VARIANTS",
    "BasicConv",
    "DenseDilatedKnnGraph",
    "Downsample",
    "DropPath",
    "DyGraphConv2d",
    "EdgeConv2d",
    "GINConv2d",
    "GraphConv2d",
    "GraphSAGE",
    "Grapher",
    "IsotropicStem",
    "IsotropicViG",
    "MRConv2d",
    "PyramidStem",
    "PyramidViG",
    "batched_index_select",
    "build_reference",
    "dense_knn_matrix",
    "get_2d_relative_pos_embed",
    "get_2d_sincos_pos_embed",
    "pairwise_distance",
    "relative_pos_bias",
    "xy_dense_knn_matrix",
    "xy_pairwise_distance",
]

# The official input size is fixed: pos_embed and the Graphers' node counts are sized for it.
IMAGE_SIZE = 224
# Hidden width of the classifier head; hard-coded in the official code (emb_dims is unused).
HEAD_HIDDEN = 1024
# Every BasicConv inside a graph conv is a grouped 1x1 conv with this many groups (hard-coded officially).
GRAPH_CONV_GROUPS = 4
# Pyramid reduce ratio (key-node avg-pool factor) per stage.
PYRAMID_REDUCE_RATIOS = (4, 2, 1, 1)

REFERENCE_VARIANTS: dict[str, dict[str, Any]] = {
    "vig_ti_224_gelu": {"family": "isotropic", "channels": 192, "blocks": 12},
    "vig_s_224_gelu": {"family": "isotropic", "channels": 320, "blocks": 16},
    "vig_b_224_gelu": {"family": "isotropic", "channels": 640, "blocks": 16},
    "pvig_ti_224_gelu": {"family": "pyramid", "channels": (48, 96, 240, 384), "blocks": (2, 2, 6, 2)},
    "pvig_s_224_gelu": {"family": "pyramid", "channels": (80, 160, 400, 640), "blocks": (2, 2, 6, 2)},
    "pvig_m_224_gelu": {"family": "pyramid", "channels": (96, 192, 384, 768), "blocks": (2, 2, 16, 2)},
    "pvig_b_224_gelu": {"family": "pyramid", "channels": (128, 256, 512, 1024), "blocks": (2, 2, 18, 2)},
}
"""Keyword arguments of :func:`build_reference` for each official variant (all: k=9, conv='mr')."""


# --------------------------------------------------------------------------------------------------------
# Relative position bias (spec 3.2)
# --------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE-style 1-D sin-cos embedding: (M,) float32 positions -> (M, dim) float64."""
    half = dim // 2
    # Frequencies in float64, in the recipe's order: f / (D/2), then 10000**that, then its reciprocal.
    omega = np.arange(half, dtype=np.float64)
    omega = omega / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    # One float32 x float64 product per entry (the float32 -> float64 widening is exact).
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """(g*g, dim) float64 2-D sin-cos embedding; nodes in raster order (index = row * g + col)."""
    if dim % 4 != 0:
        raise ValueError(f"sin-cos embedding needs dim % 4 == 0, got {dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    # 'xy' meshgrid: grid[0] holds the column (w) coordinate, grid[1] the row (h) coordinate.
    grid = np.stack(np.meshgrid(coords, coords), axis=0)  # (2, g, g)
    return np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)


def get_2d_relative_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """R = 2 P P^T / C, an (n, n) float64 similarity of the nodes' sin-cos embeddings (diagonal = 1)."""
    pos = get_2d_sincos_pos_embed(dim, grid_size)  # (n, C)
    return 2 * np.matmul(pos, pos.transpose()) / pos.shape[1]


def relative_pos_bias(channels: int, n: int, r: int) -> Tensor:
    """The pyramid Grapher's ``relative_pos`` values: (1, n, n // r**2) float32 on the CPU.

    The float64 -> float32 cast happens before the bicubic resize, and the column axis is resized as a
    1-D cubic over flattened node indices (not a 2-D pool); both are quirks of the official code, kept.
    The result is negated: it is added to a distance, so nearby nodes get a smaller distance.
    """
    grid_size = int(n**0.5)
    rel = torch.from_numpy(np.float32(get_2d_relative_pos_embed(channels, grid_size)))  # (n, n)
    rel = rel.unsqueeze(0).unsqueeze(1)  # (1, 1, n, n): interpolate wants (B, C, H, W)
    rel = F.interpolate(rel, size=(n, n // (r * r)), mode="bicubic", align_corners=False)
    return -rel.squeeze(1)  # (1, n, n // r**2)


# --------------------------------------------------------------------------------------------------------
# Dense kNN graph (spec 3.1)
# --------------------------------------------------------------------------------------------------------


def pairwise_distance(x: Tensor) -> Tensor:
    """Squared Euclidean distances (B, N, N) of x (B, N, C), as x_sq + (-2 x x^T) + x_sq^T left to right."""
    x_inner = -2 * torch.matmul(x, x.transpose(2, 1))  # (B, N, N)
    x_square = torch.sum(torch.mul(x, x), dim=-1, keepdim=True)  # (B, N, 1)
    return x_square + x_inner + x_square.transpose(2, 1)


def xy_pairwise_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared distances (B, N, M) between queries x (B, N, C) and keys y (B, M, C)."""
    xy_inner = -2 * torch.matmul(x, y.transpose(2, 1))  # (B, N, M)
    x_square = torch.sum(torch.mul(x, x), dim=-1, keepdim=True)  # (B, N, 1)
    y_square = torch.sum(torch.mul(y, y), dim=-1, keepdim=True)  # (B, M, 1)
    return x_square + xy_inner + y_square.transpose(2, 1)


def _knn_from_distance(dist: Tensor, k: int, relative_pos: Tensor | None) -> Tensor:
    """Edge index (2, B, N, k) from a distance matrix (B, N, M): [0] neighbours (ascending), [1] centres."""
    if relative_pos is not None:
        dist += relative_pos  # (1, N, M) bias broadcast over the batch, in place as officially
    _, nn_idx = torch.topk(-dist, k=k)  # (B, N, k), sorted by ascending distance
    batch, n_points = dist.shape[:2]
    center_idx = torch.arange(n_points, device=dist.device).repeat(batch, k, 1).transpose(2, 1)  # (B, N, k)
    return torch.stack((nn_idx, center_idx), dim=0)


def dense_knn_matrix(x: Tensor, k: int, relative_pos: Tensor | None = None) -> Tensor:
    """kNN among the nodes of x (B, C, N, 1) -> edge index (2, B, N, k). No gradient flows through it."""
    with torch.no_grad():
        x = x.transpose(2, 1).squeeze(-1)  # (B, N, C)
        return _knn_from_distance(pairwise_distance(x), k, relative_pos)


def xy_dense_knn_matrix(x: Tensor, y: Tensor, k: int, relative_pos: Tensor | None = None) -> Tensor:
    """kNN of each query in x (B, C, N, 1) among the keys y (B, C, M, 1) -> edge index (2, B, N, k)."""
    with torch.no_grad():
        x = x.transpose(2, 1).squeeze(-1)  # (B, N, C)
        y = y.transpose(2, 1).squeeze(-1)  # (B, M, C)
        return _knn_from_distance(xy_pairwise_distance(x, y), k, relative_pos)


class DenseDilatedKnnGraph(nn.Module):
    """Dilated kNN on L2-normalised features: k*d nearest candidates, then every d-th one.

    The normalised copies are used only for the search; the graph conv aggregates un-normalised features.
    With ``stochastic``, training mode sometimes (probability ``epsilon``) picks a random k-subset of the
    k*d candidates instead, shared by all nodes and images.
    """

    def __init__(self, k: int = 9, dilation: int = 1, stochastic: bool = False, epsilon: float = 0.0):
        super().__init__()
        self.k = k
        self.dilation = dilation
        self.stochastic = stochastic
        self.epsilon = epsilon

    def forward(self, x: Tensor, y: Tensor | None = None, relative_pos: Tensor | None = None) -> Tensor:
        x = F.normalize(x, p=2.0, dim=1)  # over channels, (B, C, N, 1)
        if y is not None:
            y = F.normalize(y, p=2.0, dim=1)
            edge_index = xy_dense_knn_matrix(x, y, self.k * self.dilation, relative_pos)
        else:
            edge_index = dense_knn_matrix(x, self.k * self.dilation, relative_pos)
        return self._dilate(edge_index)

    def _dilate(self, edge_index: Tensor) -> Tensor:
        """(2, B, N, k*d) -> (2, B, N, k)."""
        # The official code draws torch.rand(1) whenever stochastic is set, even in eval mode, so the
        # global RNG advances identically; the draw is tested before self.training.
        if self.stochastic and torch.rand(1) < self.epsilon and self.training:
            keep = torch.randperm(self.k * self.dilation)[: self.k]
            return edge_index[:, :, :, keep]
        return edge_index[:, :, :, :: self.dilation]


# --------------------------------------------------------------------------------------------------------
# Graph convolutions (spec 3.3, 3.4)
# --------------------------------------------------------------------------------------------------------


def batched_index_select(src: Tensor, idx: Tensor) -> Tensor:
    """Gather node features: src (B, C, M, 1), idx (B, N, k) -> (B, C, N, k), out[b,:,n,j] = src[b,:,idx]."""
    batch, channels, m = src.shape[:3]
    _, n, k = idx.shape
    # Offset each image's indices so one flat lookup serves the whole batch.
    flat_idx = (idx + torch.arange(batch, device=idx.device).view(batch, 1, 1) * m).reshape(-1)  # (B*N*k,)
    rows = src.squeeze(-1).transpose(1, 2).reshape(batch * m, channels)  # (B*M, C): one row per node
    out = rows[flat_idx]  # (B*N*k, C)
    return out.view(batch, n, k, channels).permute(0, 3, 1, 2).contiguous()  # (B, C, N, k)


class BasicConv(nn.Sequential):
    """The MLP inside every graph conv: grouped (groups=4) 1x1 Conv2d, BatchNorm2d, GELU (keys .0, .1)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=bias, groups=GRAPH_CONV_GROUPS),
            nn.BatchNorm2d(out_channels),
            nn.GELU(),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class MRConv2d(nn.Module):
    """Max-relative graph conv: nn(interleave(x, max_j (x_j - x_i)))."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.nn = BasicConv(in_channels * 2, out_channels, bias)

    def forward(self, x: Tensor, edge_index: Tensor, y: Tensor | None = None) -> Tensor:
        x_i = batched_index_select(x, edge_index[1])  # (B, C, N, k): the centre repeated k times
        x_j = batched_index_select(x if y is None else y, edge_index[0])  # (B, C, N, k)
        rel_max, _ = torch.max(x_j - x_i, -1, keepdim=True)  # (B, C, N, 1)
        b, c, n, _ = x.shape
        # Stacking on a new dim 2 then flattening interleaves channels as [x_0, m_0, x_1, m_1, ...]; the
        # grouped conv's weights depend on this order.
        h = torch.cat([x.unsqueeze(2), rel_max.unsqueeze(2)], dim=2)  # (B, C, 2, N, 1)
        return self.nn(h.reshape(b, 2 * c, n, 1))  # (B, 2C, N, 1) -> (B, out, N, 1)


class EdgeConv2d(nn.Module):
    """Edge conv: max_j nn([x_i | x_j - x_i]), the MLP applied per edge."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.nn = BasicConv(in_channels * 2, out_channels, bias)

    def forward(self, x: Tensor, edge_index: Tensor, y: Tensor | None = None) -> Tensor:
        x_i = batched_index_select(x, edge_index[1])  # (B, C, N, k)
        x_j = batched_index_select(x if y is None else y, edge_index[0])  # (B, C, N, k)
        # Block concatenation [x_i | x_j - x_i] (not interleaved), MLP applied per edge.
        edge_feat = self.nn(torch.cat([x_i, x_j - x_i], dim=1))  # (B, out, N, k)
        out, _ = torch.max(edge_feat, -1, keepdim=True)  # (B, out, N, 1)
        return out


class GraphSAGE(nn.Module):
    """GraphSAGE: nn2([x | max_j nn1(x_j)])."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.nn1 = BasicConv(in_channels, in_channels, bias)
        self.nn2 = BasicConv(in_channels * 2, out_channels, bias)

    def forward(self, x: Tensor, edge_index: Tensor, y: Tensor | None = None) -> Tensor:
        x_j = batched_index_select(x if y is None else y, edge_index[0])  # (B, C, N, k)
        x_j, _ = torch.max(self.nn1(x_j), -1, keepdim=True)  # (B, C, N, 1)
        return self.nn2(torch.cat([x, x_j], dim=1))  # (B, 2C, N, 1) -> (B, out, N, 1)


class GINConv2d(nn.Module):
    """GIN: nn((1 + eps) x + sum_j x_j); the centre is not added to the neighbour sum."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.nn = BasicConv(in_channels, out_channels, bias)
        self.eps = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor, edge_index: Tensor, y: Tensor | None = None) -> Tensor:
        x_j = batched_index_select(x if y is None else y, edge_index[0])  # (B, C, N, k)
        x_j = torch.sum(x_j, -1, keepdim=True)  # (B, C, N, 1)
        return self.nn((1 + self.eps) * x + x_j)


_GRAPH_CONVS: dict[str, type[nn.Module]] = {
    "mr": MRConv2d,
    "edge": EdgeConv2d,
    "sage": GraphSAGE,
    "gin": GINConv2d,
}


class GraphConv2d(nn.Module):
    """Holds the chosen graph conv as ``gconv`` (the official key prefix)."""

    def __init__(self, in_channels: int, out_channels: int, conv: str = "mr", bias: bool = True):
        super().__init__()
        if conv not in _GRAPH_CONVS:
            raise NotImplementedError(f"conv {conv!r} is not supported; choose one of {sorted(_GRAPH_CONVS)}")
        self.gconv = _GRAPH_CONVS[conv](in_channels, out_channels, bias)

    def forward(self, x: Tensor, edge_index: Tensor, y: Tensor | None = None) -> Tensor:
        return self.gconv(x, edge_index, y)


class DyGraphConv2d(GraphConv2d):
    """Dynamic graph conv: builds the kNN graph from the input, then applies the graph conv.

    With r > 1 the graph is bipartite: all H*W nodes are queries, and the keys (whose features are
    aggregated) are the r x r average-pooled nodes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "mr",
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
    ):
        super().__init__(in_channels, out_channels, conv, bias)
        self.k = kernel_size
        self.d = dilation
        self.r = r
        self.dilated_knn_graph = DenseDilatedKnnGraph(kernel_size, dilation, stochastic, epsilon)

    def forward(  # type: ignore[override]
        self, x: Tensor, relative_pos: Tensor | None = None
    ) -> Tensor:
        b, c, h, w = x.shape
        y = None
        if self.r > 1:
            y = F.avg_pool2d(x, self.r, self.r)  # (B, C, H/r, W/r)
            y = y.reshape(b, c, -1, 1).contiguous()  # (B, C, M, 1), M = H*W / r^2, raster order
        x = x.reshape(b, c, -1, 1).contiguous()  # (B, C, N, 1), N = H*W, raster order
        edge_index = self.dilated_knn_graph(x, y, relative_pos)  # (2, B, N, k)
        out = super().forward(x, edge_index, y)  # (B, out, N, 1)
        return out.reshape(b, -1, h, w).contiguous()  # (B, out, H, W)


# --------------------------------------------------------------------------------------------------------
# Blocks (spec 2, 3)
# --------------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Per-sample stochastic depth (timm style): zero a whole residual branch, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, 1, 1)
        if keep_prob > 0.0:  # rescale so the expectation is unchanged (a rate of 1 just zeroes the branch)
            mask.div_(keep_prob)
        return x * mask


def _drop_path(rate: float) -> nn.Module:
    # The official code uses Identity when the rate is 0, so no module (and no RNG draw) exists then.
    return DropPath(rate) if rate > 0.0 else nn.Identity()


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN with no activation (keys .0 and .1)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=True), nn.BatchNorm2d(out_channels))


class Grapher(nn.Module):
    """Graph block: x + drop_path(fc2(graph_conv(fc1(x)))); the graph conv outputs 2C channels.

    Pyramid Graphers (``relative_pos=True``) carry a frozen (1, n, n / r^2) ``relative_pos`` parameter
    that is added to the kNN distance; it is a parameter (not a buffer) so it sits in the state_dict and
    in ``parameters()`` like the official one.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "mr",
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
        n: int = 196,
        drop_path: float = 0.0,
        relative_pos: bool = False,
    ):
        super().__init__()
        self.channels = in_channels
        self.n = n
        self.r = r
        self.fc1 = _conv_bn(in_channels, in_channels)
        self.graph_conv = DyGraphConv2d(
            in_channels, in_channels * 2, kernel_size, dilation, conv, bias, stochastic, epsilon, r
        )
        self.fc2 = _conv_bn(in_channels * 2, in_channels)
        self.drop_path = _drop_path(drop_path)
        self.relative_pos: nn.Parameter | None = None
        if relative_pos:
            self.relative_pos = nn.Parameter(relative_pos_bias(in_channels, n, r), requires_grad=False)

    def _get_relative_pos(self, relative_pos: Tensor | None, h: int, w: int) -> Tensor | None:
        # Only reachable for inputs other than 224x224, which the official models reject anyway (pos_embed).
        if relative_pos is None or h * w == self.n:
            return relative_pos
        n = h * w
        resized = F.interpolate(relative_pos.unsqueeze(0), size=(n, n // (self.r * self.r)), mode="bicubic")
        return resized.squeeze(0)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.fc1(x)  # no activation between fc1 and the graph conv
        _, _, h, w = x.shape
        x = self.graph_conv(x, self._get_relative_pos(self.relative_pos, h, w))  # (B, 2C, H, W)
        x = self.fc2(x)  # no activation after fc2
        return self.drop_path(x) + shortcut


class FFN(nn.Module):
    """Feed-forward block: x + drop_path(BN(conv(GELU(BN(conv(x))))))."""

    def __init__(self, in_channels: int, hidden_channels: int, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = _conv_bn(in_channels, hidden_channels)
        self.act = nn.GELU()
        self.fc2 = _conv_bn(hidden_channels, in_channels)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.fc2(self.act(self.fc1(x)))
        return self.drop_path(x) + shortcut


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class IsotropicStem(nn.Module):
    """Five 3x3 convs (strides 2, 2, 2, 2, 1) with BN; GELU after all but the last BN. 224 -> 14."""

    def __init__(self, out_channels: int):
        super().__init__()
        c = out_channels
        self.convs = nn.Sequential(
            _conv3x3(3, c // 8, 2), nn.BatchNorm2d(c // 8), nn.GELU(),
            _conv3x3(c // 8, c // 4, 2), nn.BatchNorm2d(c // 4), nn.GELU(),
            _conv3x3(c // 4, c // 2, 2), nn.BatchNorm2d(c // 2), nn.GELU(),
            _conv3x3(c // 2, c, 2), nn.BatchNorm2d(c), nn.GELU(),
            _conv3x3(c, c, 1), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class PyramidStem(nn.Module):
    """Three 3x3 convs (strides 2, 2, 1) with BN; GELU after all but the last BN. 224 -> 56."""

    def __init__(self, out_channels: int):
        super().__init__()
        c = out_channels
        self.convs = nn.Sequential(
            _conv3x3(3, c // 2, 2), nn.BatchNorm2d(c // 2), nn.GELU(),
            _conv3x3(c // 2, c, 2), nn.BatchNorm2d(c), nn.GELU(),
            _conv3x3(c, c, 1), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class Downsample(nn.Module):
    """Pyramid stage transition: 3x3 stride-2 conv + BN, no activation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(in_channels, out_channels, 2), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _head(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Classifier on the pooled (B, C, 1, 1) features (keys prediction.0, .1, .4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, HEAD_HIDDEN, 1, bias=True),
        nn.BatchNorm2d(HEAD_HIDDEN),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Conv2d(HEAD_HIDDEN, num_classes, 1, bias=True),
    )


# --------------------------------------------------------------------------------------------------------
# Top-level models (spec 1, 2)
# --------------------------------------------------------------------------------------------------------


class _ViGBase(nn.Module):
    """Shared forward / debug logic. Subclasses set stem, pos_embed, backbone, prediction, stage_ends."""

    stem: nn.Module
    pos_embed: nn.Parameter
    backbone: nn.Sequential
    prediction: nn.Sequential
    stage_ends: list[int]

    def model_init(self) -> None:
        """Official final init: Kaiming-normal (fan_in, gain sqrt(2)) on every conv, zero conv biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x) + self.pos_embed
        for block in self.backbone:
            x = block(x)
        x = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        return self.prediction(x).squeeze(-1).squeeze(-1)  # (B, num_classes)

    def knn_modules(self) -> list[tuple[str, DenseDilatedKnnGraph]]:
        """(official module name, module) of every kNN graph, in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, DenseDilatedKnnGraph)]

    def forward_debug(self, x: Tensor) -> dict[str, Any]:
        """Run ``forward`` once and also record intermediate results, via temporary forward hooks.

        Returns a dict with:
          ``logits``: (B, num_classes);
          ``stem_plus_pos_embed``: (B, C0, H0, W0);
          ``stage_features``: pyramid, the output at the end of each stage; isotropic, every block's output;
          ``knn``: every Grapher's neighbour indices after dilation, (B, N, k) int64, indexing the key
          nodes (the avg-pooled ones when r > 1), in forward order;
          ``knn_names``: the official module names matching ``knn``.
        ``logits`` keeps its autograd graph (so a training step can use it); the recorded intermediates
        are detached. The model's train/eval mode is left as it is.
        """
        record: dict[str, Any] = {"stage_features": [], "knn": [], "knn_names": []}
        handles = []

        def stem_hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            # Same op as in forward, so this is bit-identical to the value forward uses.
            record["stem_plus_pos_embed"] = (out + self.pos_embed).detach()

        def stage_hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            record["stage_features"].append(out.detach())

        def knn_hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            record["knn"].append(out[0].detach())  # edge_index[0]: neighbours, (B, N, k)

        try:
            handles.append(self.stem.register_forward_hook(stem_hook))
            for i in self.stage_ends:
                handles.append(self.backbone[i].register_forward_hook(stage_hook))
            for name, module in self.knn_modules():
                record["knn_names"].append(name)
                handles.append(module.register_forward_hook(knn_hook))
            record["logits"] = self.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        return record


class IsotropicViG(_ViGBase):
    """Isotropic ViG: stem to 14x14, then blocks of (Grapher, FFN) at constant width, then the head.

    Block i uses k = int(linspace(k, 2k, blocks)[i]) neighbours and dilation min(i // 4 + 1, 196 // max k)
    (1 if not ``use_dilation``); no relative position bias, no key pooling.
    """

    def __init__(
        self,
        channels: int = 192,
        blocks: int = 12,
        k: int = 9,
        conv: str = "mr",
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        use_stochastic: bool = False,
        epsilon: float = 0.2,
        dropout: float = 0.0,
        use_dilation: bool = True,
        bias: bool = True,
        img_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        # img_size other than 224 builds the official algorithm as if it had been written for that size
        # (node counts, position embedding and largest dilation derived from it); benchmarks use it.
        # Schedules are computed on the CPU explicitly so that building under a meta device context works.
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, blocks, device="cpu")]
        num_knn = [int(v.item()) for v in torch.linspace(k, 2 * k, blocks, device="cpu")]
        max_dilation = (img_size // 16) ** 2 // max(num_knn)
        n = (img_size // 16) ** 2
        self.num_knn = num_knn
        self.dilations = [min(i // 4 + 1, max_dilation) if use_dilation else 1 for i in range(blocks)]

        self.stem = IsotropicStem(channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, img_size // 16, img_size // 16))
        layers: list[nn.Module] = []
        for i in range(blocks):
            grapher = Grapher(
                channels,
                kernel_size=num_knn[i],
                dilation=self.dilations[i],
                conv=conv,
                bias=bias,
                stochastic=use_stochastic,
                epsilon=epsilon,
                r=1,
                n=n,
                drop_path=dpr[i],
                relative_pos=False,
            )
            layers.append(nn.Sequential(grapher, FFN(channels, channels * 4, drop_path=dpr[i])))
        self.backbone = nn.Sequential(*layers)
        self.prediction = _head(channels, num_classes, dropout)
        self.stage_ends = list(range(blocks))
        self.model_init()


class PyramidViG(_ViGBase):
    """Pyramid ViG: stem to 56x56, four stages of (Grapher, FFN) blocks separated by Downsample, head.

    Every block uses k neighbours and dilation min(idx // 4 + 1, 49 // k) with idx the global block
    index; stage s pools the key nodes by r = (4, 2, 1, 1)[s] and adds the relative position bias.
    The Downsample layers sit inside the flat ``backbone`` Sequential, shifting the block indices.
    """

    def __init__(
        self,
        channels: tuple[int, int, int, int] = (48, 96, 240, 384),
        blocks: tuple[int, int, int, int] = (2, 2, 6, 2),
        k: int = 9,
        conv: str = "mr",
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        use_stochastic: bool = False,
        epsilon: float = 0.2,
        bias: bool = True,
        img_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        if len(channels) != len(PYRAMID_REDUCE_RATIOS) or len(blocks) != len(PYRAMID_REDUCE_RATIOS):
            raise ValueError("pyramid channels and blocks must have 4 entries (one per stage)")
        total = sum(blocks)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, total, device="cpu")]
        num_knn = [int(v.item()) for v in torch.linspace(k, k, total, device="cpu")]
        max_dilation = (img_size // 32) ** 2 // max(num_knn)
        self.num_knn = num_knn
        self.dilations = [min(idx // 4 + 1, max_dilation) for idx in range(total)]

        self.stem = PyramidStem(channels[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], img_size // 4, img_size // 4))
        layers: list[nn.Module] = []
        self.stage_ends = []
        n = (img_size // 4) ** 2
        idx = 0
        for stage, (c, depth) in enumerate(zip(channels, blocks)):
            if stage > 0:
                layers.append(Downsample(channels[stage - 1], c))
                n //= 4
            for _ in range(depth):
                grapher = Grapher(
                    c,
                    kernel_size=num_knn[idx],
                    dilation=self.dilations[idx],
                    conv=conv,
                    bias=bias,
                    stochastic=use_stochastic,
                    epsilon=epsilon,
                    r=PYRAMID_REDUCE_RATIOS[stage],
                    n=n,
                    drop_path=dpr[idx],
                    relative_pos=True,
                )
                layers.append(nn.Sequential(grapher, FFN(c, c * 4, drop_path=dpr[idx])))
                idx += 1
            self.stage_ends.append(len(layers) - 1)
        self.backbone = nn.Sequential(*layers)
        # The pyramid head's dropout is hard-coded to 0 officially.
        self.prediction = _head(channels[-1], num_classes, 0.0)
        self.model_init()


def build_reference(
    family: str,
    channels: int | tuple[int, ...] | list[int],
    blocks: int | tuple[int, ...] | list[int],
    k: int = 9,
    conv: str = "mr",
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    use_stochastic: bool = False,
    epsilon: float = 0.2,
    img_size: int = IMAGE_SIZE,
) -> IsotropicViG | PyramidViG:
    """Build the dense reference model of the given family ("isotropic" or "pyramid").

    isotropic: ``channels`` and ``blocks`` are ints; pyramid: 4-tuples (one entry per stage).
    Only ``img_size`` inputs work (224 by default), as in the official models. The result is in training
    mode like any new module; call ``.eval()`` before comparing outputs.
    """
    if family == "isotropic":
        if not isinstance(channels, int) or not isinstance(blocks, int):
            raise TypeError("isotropic ViG takes int channels and blocks")
        return IsotropicViG(
            channels, blocks, k, conv, num_classes, drop_path_rate, use_stochastic, epsilon, img_size=img_size
        )
    if family == "pyramid":
        if isinstance(channels, int) or isinstance(blocks, int):
            raise TypeError("pyramid ViG takes 4-tuples of channels and blocks")
        ch = tuple(int(c) for c in channels)
        bl = tuple(int(b) for b in blocks)
        if len(ch) != 4 or len(bl) != 4:
            raise ValueError("pyramid channels and blocks must have 4 entries (one per stage)")
        return PyramidViG(
            (ch[0], ch[1], ch[2], ch[3]), (bl[0], bl[1], bl[2], bl[3]),
            k, conv, num_classes, drop_path_rate, use_stochastic, epsilon, img_size=img_size,
        )  # fmt: skip
    raise ValueError(f"unknown family {family!r}; expected 'isotropic' or 'pyramid'")
