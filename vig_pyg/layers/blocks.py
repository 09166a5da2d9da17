"""ViG's two blocks: the Grapher (graph convolution over a dynamic kNN graph) and the FFN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.graph.bridge import image_to_nodes, nodes_to_image
from vig_pyg.graph.dynamic import GridKNNGraph
from vig_pyg.graph.knn import KNNMethod
from vig_pyg.layers.common import ConvNorm, DropPath
from vig_pyg.nn.mlp import activate, make_activation, residual_add
from vig_pyg.nn.registry import build_conv, takes_vig_options

__all__ = ["FFN", "Grapher", "ViGBlock"]


class Grapher(nn.Module):
    """``fc1 -> graph conv on a fresh kNN graph -> fc2``, drop path and shortcut.

    The feature map's patches are the nodes. With ``reduce_ratio > 1`` the neighbours are the nodes of
    the ``reduce_ratio``-average-pooled map (Pyramid ViG's cheap early stages): a bipartite graph from
    pooled keys to full-resolution centres. The graph conv maps ``C`` to ``2C`` channels and ``fc2`` back.

    Args:
        channels: ``C``.
        k, dilation, reduce_ratio, relative_pos, stochastic, epsilon, knn_method, grid_size: the kNN graph
            (:class:`vig_pyg.graph.dynamic.GridKNNGraph`; ``relative_pos`` adds Pyramid ViG's position term,
            precomputed for the planned ``grid_size``).
        conv: graph convolution, any name or class :func:`vig_pyg.nn.build_conv` takes.
        drop_path: stochastic depth rate of the branch.
        act, norm, bias, groups: options of ViG's own convolutions (ignored by other convs).
    """

    def __init__(
        self,
        channels: int,
        k: int = 9,
        dilation: int = 1,
        conv: Any = "mr",
        reduce_ratio: int = 1,
        relative_pos: bool = False,
        drop_path: float = 0.0,
        stochastic: bool = False,
        epsilon: float = 0.2,
        knn_method: KNNMethod = "auto",
        grid_size: tuple[int, int] | None = None,
        act: str = "gelu",
        norm: str | None = "batch",
        bias: bool = True,
        groups: int = 4,
    ) -> None:
        super().__init__()
        self.reduce_ratio = reduce_ratio
        self.fc1 = ConvNorm(channels, channels)
        self.knn = GridKNNGraph(
            k,
            dilation,
            reduce_ratio,
            channels if relative_pos else None,
            stochastic,
            epsilon,
            knn_method,
            grid_size,
        )
        conv_kwargs: dict[str, Any] = {}
        if takes_vig_options(conv):
            conv_kwargs = {"groups": groups, "act": act, "norm": norm, "bias": bias}
        self.graph_conv = build_conv(conv, channels, 2 * channels, **conv_kwargs)
        self.fc2 = ConvNorm(2 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            raise TypeError(
                "a Grapher builds its graph from the input's shape, which torch.fx.symbolic_trace cannot "
                "see; trace with vig_pyg.export.symbolic_trace(model), which keeps Graphers as leaf modules"
            )
        shortcut = x
        x = self.fc1(x)
        b, _, h, w = x.shape
        nodes = image_to_nodes(x)  # (B*H*W, C)
        if self.reduce_ratio > 1:
            keys = image_to_nodes(F.avg_pool2d(x, self.reduce_ratio, self.reduce_ratio))  # (B*M, C)
        else:
            keys = nodes
        edge_index = self.knn(nodes, keys, b, h, w)
        inputs = nodes if keys is nodes else (keys, nodes)
        x = nodes_to_image(self.graph_conv(inputs, edge_index, k=self.knn.k), b, h, w)  # (B, 2C, H, W)
        x = self.fc2(x)
        return residual_add(self.drop_path(x), shortcut)


class FFN(nn.Module):
    """``fc1 (C -> hidden) -> act -> fc2 (hidden -> C)``, each a 1x1 conv + BatchNorm; drop path, shortcut."""

    def __init__(self, channels: int, hidden: int, act: str = "gelu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.fc1 = ConvNorm(channels, hidden)
        self.act = make_activation(act)
        self.fc2 = ConvNorm(hidden, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return residual_add(self.drop_path(self.fc2(activate(self.act, self.fc1(x)))), x)


class ViGBlock(nn.Module):
    """A Grapher followed by an FFN of four times the width."""

    def __init__(
        self, channels: int, *, act: str = "gelu", drop_path: float = 0.0, **grapher_kwargs: Any
    ) -> None:
        super().__init__()
        self.grapher = Grapher(channels, act=act, drop_path=drop_path, **grapher_kwargs)
        self.ffn = FFN(channels, 4 * channels, act, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.grapher(x))
