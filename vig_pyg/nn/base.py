"""Shared input handling for the ViG graph convolutions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch_geometric.nn import MessagePassing

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["PairTensor", "ViGConv"]

PairTensor = tuple[Tensor, Tensor]


class ViGConv(MessagePassing):
    """Base of the four ViG convolutions: argument checks, pair inputs and the k-regular switch.

    Subclasses implement ``forward(x, edge_index, size=None)`` with PyG's meaning: ``x`` is a tensor, or
    a pair ``(x_src, x_dst)`` for a bipartite graph (Pyramid ViG's pooled key nodes are the sources;
    ``(x, None)`` is ``x``); ``edge_index`` is a ``(2, E)`` tensor (an ``EdgeIndex`` too), a sparse
    adjacency (``SparseTensor`` or ``torch.sparse``, transposed as PyG's convs take it) or a
    :class:`vig_pyg.graph.Graph`. A :meth:`Graph.k_regular <vig_pyg.graph.Graph.k_regular>` graph (what
    the kNN, grid and random builders make) is aggregated as an ``(N, k, C)`` view; every other graph
    through PyG's ``propagate``, as are all graphs while an explainer or message hooks are attached.
    """

    def __init__(self, in_channels: int, out_channels: int, aggr: str, groups: int) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(aggr=aggr)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups

    def _check_groups(self, width: int, what: str, channels: int) -> None:
        # Errors in the user's numbers, not the inner layer's.
        if width % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{type(self).__name__}({self.in_channels}, {self.out_channels}, groups={self.groups}): its "
                f"grouped layer takes {what} = {width} inputs and gives {channels} outputs, which groups="
                f"{self.groups} must both divide; choose widths divisible by {self.groups} or another groups"
            )

    @property
    def output_mlp(self) -> GroupedMLP | None:
        """The grouped MLP whose norm and activation end this conv, if it ends in one.

        Convs that have one take ``pre_norm=True`` in ``forward`` and then return the MLP's linear
        output only, so that a caller can fuse the norm and activation with its next layer
        (:func:`vig_pyg.nn.recompute.norm_act_linear`, as the Grapher does in training).
        """
        return None

    def _propagates(self) -> bool:
        # PyG's explainers and message hooks act inside propagate(): while any is attached, every graph
        # takes that path so that they see (and may mask) every message.
        return bool(self._explain or self._message_forward_pre_hooks or self._message_forward_hooks)

    def _split(self, x: Any, edge_index: Any) -> tuple[Tensor, Tensor, Any, int | None]:
        """``(x_src, x_dst, edges, k)``: the node sets, the edges as ``propagate`` takes them and the
        in-degree of a k-regular graph (``None`` for any other, or while propagating for hooks)."""
        k = None
        sources = None
        if isinstance(edge_index, Graph):
            k, sources, edge_index = edge_index.k, edge_index.sources, edge_index.edge_index
        elif isinstance(edge_index, Tensor) and edge_index.layout == torch.strided:
            if edge_index.is_floating_point() or edge_index.dim() != 2 or edge_index.size(0) != 2:
                raise TypeError(
                    "edge_index must be an integer (2, num_edges) tensor, a sparse adjacency or a "
                    f"vig_pyg.graph.Graph, got a {edge_index.dtype} tensor of shape {tuple(edge_index.shape)}"
                )
        if isinstance(x, Tensor):
            x_src = x_dst = x
            if sources is not None:
                x_src = sources
        elif isinstance(x, tuple | list) and len(x) == 2 and isinstance(x[0], Tensor):
            x_src, x_dst = x[0], x[1] if x[1] is not None else x[0]
            if not isinstance(x_dst, Tensor):
                raise TypeError("x must be a (N, C) tensor or a pair (x_src, x_dst) of tensors")
        else:
            raise TypeError("x must be a (N, C) tensor or a pair (x_src, x_dst) of tensors")
        for name, t in (("x_src", x_src), ("x_dst", x_dst)):
            if t.dim() != 2 or t.size(1) != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__} expects {name} of shape (num_nodes, {self.in_channels}), "
                    f"got {tuple(t.shape)}"
                )
        if k is not None and edge_index.size(1) != x_dst.size(0) * k:
            raise ValueError(
                f"the graph is k-regular with k={k}, which needs {x_dst.size(0) * k} edges for "
                f"{x_dst.size(0)} target nodes, but it has {edge_index.size(1)}"
            )
        if self._propagates():
            k = None
        return x_src, x_dst, edge_index, k

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, groups={self.groups})"
