"""Max-relative graph convolution (MRConv), the default ViG convolution."""

from __future__ import annotations

import torch
from torch import Tensor

from vig_pyg.nn.aggr import gather_max
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP

__all__ = ["MRConv"]


class MRConv(ViGConv):
    r"""The max-relative graph convolution from `"Vision GNN: An Image is Worth Graph of Nodes"
    <https://arxiv.org/abs/2206.00272>`_ (after `DeepGCNs <https://arxiv.org/abs/1904.03751>`_).

    .. math::
        \mathbf{m}_i = \max_{j \in \mathcal{N}(i)} \left( \mathbf{x}_j - \mathbf{x}_i \right), \qquad
        \mathbf{x}^{\prime}_i = h_{\mathbf{\Theta}}\left( \mathbf{x}_i \,\Vert_{\text{interleaved}}\,
        \mathbf{m}_i \right)

    where :math:`h_{\mathbf{\Theta}}` is a grouped linear layer, BatchNorm and an activation, and the two
    inputs are interleaved channel by channel (:math:`[x_0, m_0, x_1, m_1, \ldots]`), the order the
    official weights expect. The max is taken over :math:`\mathbf{x}_j` and :math:`\mathbf{x}_i`
    subtracted once per node, which is the same in floating point.

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
        if k is not None:
            rel = gather_max(x_src, edge_index, k) - x_dst  # (N, C)
        else:
            rel = self.propagate(edge_index, x=(x_src, x_dst))
        h = torch.stack([x_dst, rel], dim=-1).flatten(1)  # (N, 2C) as [x_0, m_0, x_1, m_1, ...]
        return self.nn(h)

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return x_j - x_i
