"""Graph isomorphism convolution as ViG uses it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.typing import Adj, Size

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.aggr import gather_neighbors
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["GINConv"]


class GINConv(ViGConv):
    r"""The graph isomorphism operator from `"How Powerful are Graph Neural Networks?"
    <https://arxiv.org/abs/1810.00826>`_, with ViG's grouped MLP (`Vision GNN
    <https://arxiv.org/abs/2206.00272>`_).

    .. math::
        \mathbf{x}^{\prime}_i = h_{\mathbf{\Theta}} \left( (1 + \epsilon) \cdot
        \mathbf{x}_i + \sum_{j \in \mathcal{N}(i)} \mathbf{x}_j \right)

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        groups (int, optional): Channel groups of the linear layer. (default: :obj:`4`)
        act (str, optional): Activation. (default: :obj:`"gelu"`)
        norm (str, optional): :obj:`"batch"` or :obj:`None`. (default: :obj:`"batch"`)
        bias (bool, optional): Bias in the linear layer. (default: :obj:`True`)
        eps (float, optional): Initial :math:`\epsilon`. (default: :obj:`0.`)
        train_eps (bool, optional): Learn :math:`\epsilon` (the official layer does); otherwise it is a
            buffer. (default: :obj:`True`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V}_s|, F_{in}), (|\mathcal{V}_t|, F_{in}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or :math:`(|\mathcal{V}_t|, F_{out})`
          if bipartite
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 4,
        act: str | None = "gelu",
        norm: str | None = "batch",
        bias: bool = True,
        eps: float = 0.0,
        train_eps: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, aggr="sum", groups=groups)
        self._check_groups(in_channels, "in_channels", out_channels)
        self.nn = GroupedMLP(in_channels, out_channels, groups, act, norm, bias)
        self.initial_eps = eps
        if train_eps:
            self.eps = nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("eps", torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn.reset_parameters()
        self.eps.data.fill_(self.initial_eps)

    @property
    def output_mlp(self) -> GroupedMLP:
        return self.nn

    def forward(
        self, x: Tensor | PairTensor, edge_index: Adj | Graph, size: Size = None, *, pre_norm: bool = False
    ) -> Tensor:
        x_src, x_dst, edge_index, k = self._split(x, edge_index)
        if k is not None:
            agg = gather_neighbors(x_src, edge_index, k).sum(dim=1)  # (N, C)
        else:
            agg = self.propagate(edge_index, x=(x_src, x_dst), size=size)
        return self.nn((1 + self.eps) * x_dst + agg, pre_norm=pre_norm)

    def message(self, x_j: Tensor) -> Tensor:
        return x_j
