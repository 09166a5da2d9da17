"""Max-relative graph convolution (MRConv), the default ViG convolution."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch_geometric.typing import Adj, Size

from vig_pyg import ops
from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.mlp import GroupedMLP, grouped_linear
from vig_pyg.nn.recompute import autocast_like, autocast_state, grouped_linear_grads
from vig_pyg.ops.aggregate import MAX_K_POSITIONS, interleave, scatter_to_sources, winner_sources

__all__ = ["MRConv"]


class _ReplayedMaxRelativeLinear(torch.autograd.Function):
    """``lin([x_dst, max_j x_src[j] - x_dst] interleaved)`` with ``(x_src, x_dst) =
    source_fn(*source_inputs)``, keeping for backward only ``source_inputs`` and the winners' positions
    (uint8): backward replays ``source_fn`` and rebuilds the ``(N, 2C)`` input of the linear layer from
    one ``(N, C)`` gather. Gradients of the max go to the first neighbour reaching it."""

    @staticmethod
    def forward(ctx, index, k, weight, bias, groups, source_fn, *source_inputs):  # type: ignore[override]
        x_src, x_dst = source_fn(*source_inputs)
        h, pos = ops.max_relative(x_src, x_dst, index, k, True)  # (N, 2C), (N, C)
        ctx.save_for_backward(index, pos, weight, *source_inputs)
        ctx.k, ctx.groups, ctx.has_bias, ctx.source_fn = k, groups, bias is not None, source_fn
        out = grouped_linear(h, weight, bias, groups)
        ctx.autocast, ctx.dtype = autocast_state(weight), out.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        index, pos, weight, *kept = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in kept]
        with torch.enable_grad(), autocast_like(ctx.autocast):
            x_src, x_dst = ctx.source_fn(*inputs)
        source = winner_sources(index, ctx.k, pos)  # (N, C) source node of every max
        rel = x_src.detach().gather(0, source).sub_(x_dst.detach())
        h = interleave(x_dst.detach(), rel)
        grad_h, grad_w, grad_b = grouped_linear_grads(grad_out, h, weight, ctx.groups, ctx.dtype)
        grad_h = grad_h.view(grad_h.size(0), -1, 2)
        grad_rel = grad_h[..., 1]
        grad_dst = grad_h[..., 0] - grad_rel
        grad_src = scatter_to_sources(grad_rel, source, x_src.size(0))
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad((x_src, x_dst), wanted, (grad_src, grad_dst)))
        grad_inputs = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return None, None, grad_w, grad_b if ctx.has_bias else None, None, None, *grad_inputs


def _replay(index, k, groups, source_fn, computed, num_sources, *tensors):
    sources, (weight, bias) = tensors[:num_sources], tensors[num_sources:]
    if not torch.is_grad_enabled():  # the first pass, under the caller's no_grad: nothing to keep
        x_src, x_dst = computed if computed is not None else source_fn(*sources)
        return grouped_linear(ops.max_relative(x_src, x_dst, index, k, False)[0], weight, bias, groups)
    return _ReplayedMaxRelativeLinear.apply(index, k, weight, bias, groups, source_fn, *sources)


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
        self._check_groups(2 * in_channels, "2 x in_channels", out_channels)
        self.nn = GroupedMLP(2 * in_channels, out_channels, groups, act, norm, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.nn.reset_parameters()

    @property
    def output_mlp(self) -> GroupedMLP:
        return self.nn

    def replayable(
        self,
        graph: Graph,
        source_fn: Callable[..., PairTensor],
        source_inputs: Sequence[Tensor],
        computed: PairTensor | None = None,
    ) -> tuple[Callable[..., Tensor], tuple[Tensor | None, ...]]:
        """This conv as a pure function of tensors, for callers that rebuild its output in backward.

        Returns ``(fn, tensors)`` such that ``fn(*tensors)`` equals
        ``self(source_fn(*source_inputs), graph, pre_norm=True)`` for a k-regular ``graph``; ``tensors`` are
        ``source_inputs`` followed by this conv's weights. ``source_fn`` maps ``source_inputs`` to the
        pair ``(x_src, x_dst)`` and must not update any state (the Grapher passes its fc1 BatchNorm,
        replayed, and pooling). Under autograd ``fn`` keeps only ``source_inputs`` and the positions of
        the maxima for its own backward, and replays ``source_fn`` there. ``computed``: the pair, if the
        caller already has it (then the first, no-autograd call uses it instead of running ``source_fn``).
        """
        k = graph.k
        if k is None or not 1 <= k <= MAX_K_POSITIONS:
            raise ValueError(
                f"replayable() needs a k-regular graph with k <= {MAX_K_POSITIONS} (the max positions are "
                f"bytes), got {graph!r}"
            )
        lin = self.nn.lin
        fn = functools.partial(
            _replay, graph.edge_index[0], k, lin.groups, source_fn, computed, len(source_inputs)
        )
        return fn, (*source_inputs, lin.weight, lin.bias)

    def forward(
        self, x: Tensor | PairTensor, edge_index: Adj | Graph, size: Size = None, *, pre_norm: bool = False
    ) -> Tensor:
        x_src, x_dst, edge_index, k = self._split(x, edge_index)
        if k is not None and k <= MAX_K_POSITIONS:  # k-regular: one operator (vig_pyg.ops.aggregate)
            # The winners' positions, a byte per value, are what backward keeps where x_src needs a gradient.
            h = ops.max_relative(x_src, x_dst, edge_index[0], k, x_src.requires_grad)[0]
        else:
            h = interleave(
                x_dst, self.propagate(edge_index, x=(x_src, x_dst), size=size)
            )  # [x_i, max_j x_j - x_i]
        return self.nn(h, pre_norm=pre_norm)

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return x_j - x_i
