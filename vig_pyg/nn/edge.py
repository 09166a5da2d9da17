"""Edge convolution as ViG uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.typing import Adj, Size

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.aggr import gather_neighbors
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP, activate, fold_batch_norm

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
        self._check_groups(2 * in_channels, "2 x in_channels", out_channels)
        self.nn = GroupedMLP(2 * in_channels, out_channels, groups, act, norm, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn.reset_parameters()

    def forward(self, x: Tensor | PairTensor, edge_index: Adj | Graph, size: Size = None) -> Tensor:
        x_src, x_dst, edge_index, k = self._split(x, edge_index)
        if k is None:
            return self.propagate(edge_index, x=(x_src, x_dst), size=size)
        # Linear in its input: lin([x_i, x_j - x_i]) = (W_i - W_j) x_i + W_j x_j + b, two GEMMs over the
        # nodes instead of one over every edge (k times the rows, twice the width); only the sum, the
        # norm (statistics over edges, as before) and the activation run per edge. An eval BatchNorm is an
        # affine map of that sum and folds into both GEMMs.
        weight, bias = self._dense_weight(), self.nn.lin.bias
        norm = self.nn.norm
        folded = isinstance(norm, nn.BatchNorm1d) and not norm.training
        if folded:
            weight, bias = fold_batch_norm(weight, bias, norm)
        w_i, w_j = weight[:, : self.in_channels], weight[:, self.in_channels :]
        per_target = F.linear(x_dst, w_i - w_j, bias)  # (N, F_out)
        h = gather_neighbors(F.linear(x_src, w_j), edge_index, k).add_(
            per_target.unsqueeze(1)
        )  # (N, k, F_out)
        h = activate(self.nn.act, h) if folded else self.nn.norm_act(h.view(-1, h.size(-1))).view_as(h)
        return h.amax(dim=1)  # (N, F_out)

    def _dense_weight(self) -> Tensor:
        """The grouped layer as its block-diagonal ``(F_out, 2C)`` matrix."""
        lin = self.nn.lin
        return torch.block_diag(*lin.weight.view(lin.groups, lin.out_channels // lin.groups, -1).unbind(0))

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return self.nn(torch.cat([x_i, x_j - x_i], dim=-1))
