"""Grouped linear layers: a linear map whose channels split into independent blocks (a grouped 1x1 conv).

Plain functions (no module state), shared by the conv MLPs (:mod:`vig_pyg.nn.mlp`) and by the operators
that rebuild a layer's input in backward (:mod:`vig_pyg.ops.norm_act`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grouped_linear", "grouped_linear_backward"]


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``(N, Cin) -> (N, Cout)`` with block-diagonal ``weight`` of shape ``(Cout, Cin / groups)``."""
    if groups == 1:
        return F.linear(x, weight, bias)
    n, c_in = x.shape
    c_out = weight.size(0)
    xg = x.view(n, groups, c_in // groups).transpose(0, 1)  # (G, N, Cin/G)
    w = weight.view(groups, c_out // groups, -1).transpose(1, 2)  # (G, Cin/G, Cout/G)
    if bias is None:
        out = torch.bmm(xg, w)
    else:
        out = torch.baddbmm(bias.view(groups, 1, c_out // groups), xg, w)  # (G, N, Cout/G)
    return out.transpose(0, 1).reshape(n, c_out)


def grouped_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`grouped_linear` for input, weight and bias, from ``(N, Cout)`` ``grad_out``.

    For layers whose input is recomputed in backward rather than kept (:mod:`vig_pyg.ops.norm_act`).
    """
    grad_bias = grad_out.sum(0)
    if groups == 1:
        return grad_out @ weight, grad_out.t() @ x, grad_bias
    n, c_out = grad_out.shape
    go = grad_out.view(n, groups, c_out // groups).transpose(0, 1)  # (G, N, Cout/G)
    xg = x.view(n, groups, -1).transpose(0, 1)  # (G, N, Cin/G)
    w = weight.view(groups, c_out // groups, -1)  # (G, Cout/G, Cin/G)
    grad_x = torch.bmm(go, w).transpose(0, 1).reshape(n, -1)
    grad_w = torch.bmm(go.transpose(1, 2), xg).reshape_as(weight)
    return grad_x, grad_w, grad_bias
