"""Edge convolution as ViG uses it."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.nn.aggr import gather_neighbors
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["EdgeConv"]


class EdgeConv(ViGConv):
    r"""The edge convolution from `"Dynamic Graph CNN for Learning on Point Clouds"
    <https://arxiv.org/abs/1801.07829>`_, with ViG's grouped MLP (`Vision GNN
    <https://arxiv.org/abs/2206.00272>`_).

    .. math::
        \mathbf{x}^{\prime}_i = \max_{j \in \mathcal{N}(i)}
        h_{\mathbf{\Theta}}\left( \mathbf{x}_i \, \Vert \, \mathbf{x}_j - \mathbf{x}_i \right)

    where :math:`h_{\mathbf{\Theta}}` (grouped linear layer, BatchNorm, activation) runs on every edge and
    :math:`\Vert` is block concatenation.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        groups (int, optional): Channel groups of the linear layer. (default: :obj:`4`)
        act (str, optional): Activation. (default: :obj:`"gelu"`)
        norm (str, optional): :obj:`"batch"` or :obj:`None`. (default: :obj:`"batch"`)
        bias (bool, optional): Bias in the linear layer. (default: :obj:`True`)

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
        self.nn = GroupedMLP(2 * in_channels, out_channels, groups, act, norm, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn.reset_parameters()

    def forward(self, x: Tensor | PairTensor, edge_index: Tensor, k: int | None = None) -> Tensor:
        x_src, x_dst = self._split(x, edge_index, k)
        if k is None:
            return self.propagate(edge_index, x=(x_src, x_dst))
        x_j = gather_neighbors(x_src, edge_index, k)  # (N, k, C)
        x_i = x_dst.unsqueeze(1).expand_as(x_j)  # (N, k, C)
        return self.nn(torch.cat([x_i, x_j - x_i], dim=-1)).amax(dim=1)  # (N, F_out)

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return self.nn(torch.cat([x_i, x_j - x_i], dim=-1))
