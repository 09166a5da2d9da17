"""Shared input handling for the ViG graph convolutions."""

from __future__ import annotations

from torch import Tensor
from torch_geometric.nn import MessagePassing

from vig_pyg.nn.aggr import check_k_regular
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["PairTensor", "ViGConv"]

PairTensor = tuple[Tensor, Tensor]


class ViGConv(MessagePassing):
    """Base of the four ViG convolutions: argument checks, pair inputs and the k-regular switch.

    Subclasses implement ``forward(x, edge_index, k=None)``. ``x`` is a tensor, or a pair
    ``(x_src, x_dst)`` for a bipartite graph (Pyramid ViG's pooled key nodes are the sources). When the
    caller passes ``k``, it promises that ``edge_index`` is sorted by target with exactly ``k`` edges per
    target (what :func:`vig_pyg.graph.knn_graph` returns); aggregation then reduces an ``(N, k, C)`` view
    instead of scattering. With ``k=None`` any graph works, through PyG's aggregation.
    """

    def __init__(self, in_channels: int, out_channels: int, aggr: str, groups: int) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(aggr=aggr)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups

    @property
    def output_mlp(self) -> GroupedMLP | None:
        """The grouped MLP whose norm and activation end this conv, if it ends in one.

        Convs that have one take ``pre_norm=True`` in ``forward`` and then return the MLP's linear
        output only, so that a caller can fuse the norm and activation with its next layer
        (:func:`vig_pyg.nn.recompute.norm_act_linear`, as the Grapher does in training).
        """
        return None

    def _split(self, x: Tensor | PairTensor, edge_index: Tensor, k: int | None) -> PairTensor:
        if isinstance(x, Tensor):
            x_src = x_dst = x
        elif isinstance(x, tuple | list) and len(x) == 2 and all(isinstance(t, Tensor) for t in x):
            x_src, x_dst = x
        else:
            raise TypeError("x must be a (N, C) tensor or a pair (x_src, x_dst) of tensors")
        for name, t in (("x_src", x_src), ("x_dst", x_dst)):
            if t.dim() != 2 or t.size(1) != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__} expects {name} of shape (num_nodes, {self.in_channels}), "
                    f"got {tuple(t.shape)}"
                )
        if not isinstance(edge_index, Tensor) or edge_index.dtype.is_floating_point:
            raise TypeError("edge_index must be an integer tensor of shape (2, num_edges)")
        if k is not None:
            check_k_regular(edge_index, x_dst.size(0), k)
        return x_src, x_dst

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, groups={self.groups})"
