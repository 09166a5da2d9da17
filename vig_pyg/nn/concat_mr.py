"""Max-relative convolution with concatenated inputs: MobileViG's and GreedyViG's graph convolution."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.typing import Adj, Size

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.aggr import gather_max
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["ConcatMRConv"]


class ConcatMRConv(ViGConv):
    r"""The max-relative convolution of `MobileViG <https://arxiv.org/abs/2307.00395>`_ and
    `GreedyViG <https://arxiv.org/abs/2405.06849>`_:

    .. math::
        \mathbf{m}_i = \max_{j \in \mathcal{N}(i)} s\,(\mathbf{x}_j - \mathbf{x}_i), \qquad
        \mathbf{x}^{\prime}_i = h_{\mathbf{\Theta}}\left( \mathbf{x}_i \,\Vert\, \mathbf{m}_i \right)

    with :math:`\Vert` block concatenation (not ViG's interleaving) and the sign :math:`s`: ``+1``
    (GreedyViG's neighbour minus centre) or ``-1`` (MobileViG's centre minus neighbour). Their maps start
    the max at zero; over a graph with self loops (the ``svga`` and ``dagc`` builders have them) that is the
    self edge's ``0``. :math:`h_{\mathbf{\Theta}}` is a linear layer (``groups``, 1 officially), BatchNorm
    and an activation.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        sign (int, optional): ``1`` or ``-1``. (default: :obj:`1`)
        groups (int, optional): Channel groups of the linear layer. (default: :obj:`1`)
        act (str, optional): Activation. (default: :obj:`"gelu"`)
        norm (str, optional): :obj:`"batch"` or :obj:`None`. (default: :obj:`"batch"`)
        bias (bool, optional): Bias in the linear layer. (default: :obj:`True`)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        sign: int = 1,
        groups: int = 1,
        act: str | None = "gelu",
        norm: str | None = "batch",
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, aggr="max", groups=groups)
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 (x_j - x_i) or -1 (x_i - x_j), got {sign!r}")
        self._check_groups(2 * in_channels, "2 x in_channels", out_channels)
        self.sign = sign
        self.nn = GroupedMLP(2 * in_channels, out_channels, groups, act, norm, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn.reset_parameters()

    @property
    def output_mlp(self) -> GroupedMLP:
        return self.nn

    def forward(
        self, x: Tensor | PairTensor, edge_index: Adj | Graph, size: Size = None, *, pre_norm: bool = False
    ) -> Tensor:
        x_src, x_dst, edge_index, k = self._split(x, edge_index)
        if k is not None:  # k-regular: max_j s x_j - s x_i, the max by the neighbour-max operator
            rel = gather_max(self.sign * x_src, edge_index, k) - self.sign * x_dst
        else:
            rel = self.propagate(edge_index, x=(x_src, x_dst), size=size)
        return self.nn(torch.cat([x_dst, rel], dim=-1), pre_norm=pre_norm)

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return self.sign * (x_j - x_i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, sign={self.sign})"
