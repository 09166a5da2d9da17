"""ViG's two blocks: the Grapher (graph convolution over a dynamic kNN graph) and the FFN."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from vig_pyg.graph.bridge import image_to_nodes, nodes_to_image
from vig_pyg.graph.builders import GraphBuilder, PatchGrid, build_graph
from vig_pyg.graph.knn import KNNMethod
from vig_pyg.layers.common import ConvNorm, DropPath
from vig_pyg.nn.aggr import MAX_K_POSITIONS
from vig_pyg.nn.mlp import activate, make_activation, residual_add
from vig_pyg.nn.mr import MRConv
from vig_pyg.nn.recompute import batch_norm_once, norm_act_linear, replays_in_backward
from vig_pyg.nn.registry import build_conv, takes_vig_options
from vig_pyg.ops.norm_act import activation_name

__all__ = ["FFN", "Grapher", "ViGBlock"]


class Grapher(nn.Module):
    """``fc1 -> graph conv on the block's graph -> fc2``, drop path and shortcut.

    The feature map's patches are the nodes; the graph builder (ViG's dynamic kNN by default, or any
    :func:`vig_pyg.graph.build_graph` takes) joins them on every forward pass, and the graph conv maps
    ``C`` to ``2C`` channels over that graph and ``fc2`` back. With ``reduce_ratio > 1`` the sources are
    the nodes of the ``reduce_ratio``-average-pooled map (Pyramid ViG's cheap early stages): a bipartite
    graph from pooled keys to full-resolution centres.

    Args:
        channels: ``C``.
        graph: the graph builder: a name (``"knn"``, ``"grid"``, ``"random"``, ``"radius"``, or one
            registered with :func:`vig_pyg.graph.register_graph`), a builder class or factory, or a built
            :class:`vig_pyg.graph.GraphBuilder`.
        graph_kwargs: options for the builder (e.g. ``{"r": 0.8}`` for ``radius``).
        k, dilation, reduce_ratio, relative_pos, stochastic, epsilon, knn_method, grid_size: the block's
            graph settings, passed to the builder where it takes them (``knn`` takes all of them;
            ``relative_pos`` adds Pyramid ViG's position term, precomputed for the planned ``grid_size``).
        conv: graph convolution, any name or class :func:`vig_pyg.nn.build_conv` takes.
        conv_kwargs: further options of the conv (e.g. ``{"heads": 2, "concat": False}`` for ``"gat"``).
        drop_path: stochastic depth rate of the branch.
        act, norm, bias, groups: options of ViG's own convolutions (ignored by other convs).

    In training, a ViG conv's norm and activation run with fc2's linear map as one operator that keeps only
    the conv's pre-norm output for backward, and with MRConv on a k-regular graph (``k <= 256``) everything
    from fc1's linear output to fc2's norm is replayed in backward instead (:mod:`vig_pyg.nn.recompute`).
    ``memory_saving`` says whether (on for ViG's convs with a BatchNorm and a parameter-free activation; a
    per-block switch).
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
        graph: Any = "knn",
        graph_kwargs: dict[str, Any] | None = None,
        conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = ConvNorm(channels, channels)
        if isinstance(graph, GraphBuilder):
            if graph_kwargs:
                raise ValueError(
                    "graph_kwargs configure a builder by name or class, not a built GraphBuilder"
                )
            self.graph = graph
        else:
            self.graph = build_graph(
                graph,
                graph_kwargs,
                k=k,
                dilation=dilation,
                reduce_ratio=reduce_ratio,
                channels=channels,
                relative_pos=relative_pos,
                stochastic=stochastic,
                epsilon=epsilon,
                method=knn_method,
                grid_size=grid_size,
            )
        options: dict[str, Any] = {}
        if takes_vig_options(conv):
            options = {"groups": groups, "act": act, "norm": norm, "bias": bias}
        self.graph_conv = build_conv(conv, channels, 2 * channels, **{**options, **(conv_kwargs or {})})
        self.fc2 = ConvNorm(2 * channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mlp = getattr(self.graph_conv, "output_mlp", None)
        self.supports_memory_saving = (
            mlp is not None
            and isinstance(mlp.norm, nn.modules.batchnorm._BatchNorm)
            and activation_name(mlp.act) is not None
        )
        self.memory_saving = self.supports_memory_saving
        builder = self.graph
        self._replays_mr = (
            isinstance(self.graph_conv, MRConv) and builder.regular and (builder.k or 0) <= MAX_K_POSITIONS
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            raise TypeError(
                "a Grapher builds its graph from the input's shape, which torch.fx.symbolic_trace cannot "
                "see; trace with vig_pyg.export.symbolic_trace(model), which keeps Graphers as leaf modules"
            )
        grid = PatchGrid(*x.shape[:1], *x.shape[2:])
        conv = self.graph_conv
        saving = self.training and self.memory_saving
        if saving and self._replays_mr and replays_in_backward(x):
            out = self._train_mr(x, grid)
        else:
            nodes = image_to_nodes(self.fc1(x))  # (B*H*W, C)
            graph = self.graph(nodes, grid)
            if saving:
                # Training: the conv's norm + act and fc2's linear map as one operator that keeps only the
                # conv's pre-norm output for backward (vig_pyg.nn.recompute).
                mlp, fc2 = conv.output_mlp, self.fc2.conv
                out = conv(nodes, graph, pre_norm=True)  # (B*H*W, 2C)
                out = norm_act_linear(out, mlp.norm, mlp.act, fc2.weight.flatten(1), fc2.bias)
                out = self.fc2.norm(nodes_to_image(out, *grid))
            else:
                out = self.fc2(nodes_to_image(conv(nodes, graph), *grid))  # (B, C, H, W)
        return residual_add(self.drop_path(out), x)

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}"

    def _sources(self, replay_norm, grid, pre, weight, bias) -> tuple[Tensor, Tensor]:
        # fc1's norm replayed on its linear output, then the builder's key nodes: the conv's (x_src, x_dst).
        nodes = replay_norm(pre, weight, bias)
        return self.graph.key_nodes(nodes, grid), nodes

    def _train_mr(self, x: Tensor, grid: PatchGrid) -> Tensor:
        """Training with MRConv: everything between fc1's linear map and fc2's norm (fc1's norm, the
        pooling, the conv, its norm + act, fc2's linear map) is replayed in backward from fc1's linear
        output, the one tensor kept (vig_pyg.nn.recompute). Same results as the plain layers."""
        norm, mlp, fc2 = self.fc1.norm, self.graph_conv.nn, self.fc2.conv
        b, h, w = grid
        pre = self.fc1.project(x).view(b * h * w, -1)  # (B*H*W, C) before the norm
        nodes, replay = batch_norm_once(norm, pre)  # updates the running statistics, once
        graph = self.graph(nodes, grid)
        keys = graph.sources if graph.sources is not None else nodes
        sources = functools.partial(self._sources, replay, grid)
        conv = self.graph_conv.replayable(
            graph, sources, (pre, norm.weight, norm.bias), computed=(keys, nodes)
        )
        x = norm_act_linear(None, mlp.norm, mlp.act, fc2.weight.flatten(1), fc2.bias, recompute_from=conv)
        return self.fc2.norm(nodes_to_image(x, b, h, w))


class FFN(nn.Module):
    """``fc1 (C -> hidden) -> act -> fc2 (hidden -> C)``, each a 1x1 conv + BatchNorm; drop path, shortcut.

    In training, fc1's norm and activation run with fc2's linear map as one operator that keeps only fc1's
    linear output for backward (:func:`vig_pyg.nn.recompute.norm_act_linear`); ``memory_saving`` (on
    unless the activation has parameters) says whether, and can be switched off per block.
    """

    def __init__(self, channels: int, hidden: int, act: str = "gelu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.fc1 = ConvNorm(channels, hidden)
        self.act = make_activation(act)
        self.fc2 = ConvNorm(hidden, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.supports_memory_saving = activation_name(self.act) is not None
        self.memory_saving = self.supports_memory_saving

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.memory_saving:
            b, _, h, w = x.shape
            hidden = self.fc1.project(x).view(b * h * w, -1)  # (B*H*W, hidden) before the norm
            fc2 = self.fc2.conv
            out = norm_act_linear(hidden, self.fc1.norm, self.act, fc2.weight.flatten(1), fc2.bias)
            out = self.fc2.norm(nodes_to_image(out, b, h, w))
        else:
            out = self.fc2(activate(self.act, self.fc1(x)))
        return residual_add(self.drop_path(out), x)

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}"


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
