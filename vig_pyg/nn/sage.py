"""GraphSAGE convolution as ViG uses it."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.typing import Adj, Size

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.aggr import gather_max, gather_neighbors
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["GraphSAGE"]


class GraphSAGE(ViGConv):
    r"""The GraphSAGE operator from `"Inductive Representation Learning on Large Graphs"
    <https://arxiv.org/abs/1706.02216>`_ with max-pooling aggregation, as `Vision GNN
    <https://arxiv.org/abs/2206.00272>`_ uses it.

    .. math::
        \mathbf{m}_i = \max_{j \in \mathcal{N}(i)} h_{\mathbf{\Theta}_1}(\mathbf{x}_j), \qquad
        \mathbf{x}^{\prime}_i = h_{\mathbf{\Theta}_2}\left( \mathbf{x}_i \, \Vert \, \mathbf{m}_i \right)

    where each :math:`h` is a grouped linear layer, BatchNorm and an activation; :math:`h_{\mathbf{\Theta}_1}`
    runs on every edge (so BatchNorm sees edge statistics in training, as in the official layer).

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        groups (int, optional): Channel groups of the linear layers. (default: :obj:`4`)
        act (str, optional): Activation. (default: :obj:`"gelu"`)
        norm (str, optional): :obj:`"batch"` or :obj:`None`. (default: :obj:`"batch"`)
        bias (bool, optional): Bias in the linear layers. (default: :obj:`True`)

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
    ) -> None:
        super().__init__(in_channels, out_channels, aggr="max", groups=groups)
        self._check_groups(in_channels, "in_channels", out_channels)
        self.nn1 = GroupedMLP(in_channels, in_channels, groups, act, norm, bias)
        self.nn2 = GroupedMLP(2 * in_channels, out_channels, groups, act, norm, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn1.reset_parameters()
        self.nn2.reset_parameters()

    @property
    def output_mlp(self) -> GroupedMLP:
        return self.nn2

    def forward(
        self, x: Tensor | PairTensor, edge_index: Adj | Graph, size: Size = None, *, pre_norm: bool = False
    ) -> Tensor:
        x_src, x_dst, edge_index, k = self._split(x, edge_index)
        if k is None:
            agg = self.propagate(edge_index, x=(x_src, x_dst), size=size)
        elif self.nn1.norm.training:  # BatchNorm statistics over the edges: nn1 runs on every edge
            agg = self.nn1(gather_neighbors(x_src, edge_index, k)).amax(dim=1)  # (N, C)
        else:  # nn1 of an edge depends on its source alone: once per source node, then the max over k
            agg = gather_max(self.nn1(x_src), edge_index, k)  # (N, C)
        return self.nn2(torch.cat([x_dst, agg], dim=-1), pre_norm=pre_norm)

    def message(self, x_j: Tensor) -> Tensor:
        return self.nn1(x_j)
