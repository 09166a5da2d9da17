"""BatchNorm, activation and the next layer as one operator that keeps only its input for backward.

In a training step most of a ViG block's activation memory is not the output of its GEMMs but of the
cheap element-wise work between them: a BatchNorm keeps its input, the activation keeps the BatchNorm's
output, and the next layer keeps the activation's output, three tensors of the same size. These
operators keep only the first (and the batch statistics, a few floats per channel) and rebuild the other
two in backward, one normalisation and one activation pass, far cheaper than the layer itself:

* ``vig_pyg::norm_act_linear(y, ...)``: ``grouped_linear(act(batch_norm(y)))`` on ``(rows, C)`` node
  features (the FFN's hidden layer, the Grapher's conv output into ``fc2``);
* ``vig_pyg::norm_act_conv(y, ...)``: ``conv2d(act(batch_norm(y)))`` on ``(B, C, H, W)`` maps (the stem).

The operators are functional (PyTorch registers autograd formulas only for those): with batch statistics
they return the batch mean and inverse standard deviation, from which the caller updates the running
statistics (:func:`update_running_stats`, as ``nn.BatchNorm`` would, up to float rounding of the variance
recovered from its inverse square root); with running statistics they only read them. The backward
formula is written with ATen's own backward kernels (``native_batch_norm_backward``, ``gelu_backward``,
...), so the result and the gradients are those of the plain layers. Eager mode, ``torch.compile`` and
``torch.export`` call the same operator; its one implementation is PyTorch's, for every device and dtype,
and under autocast backward re-enters the forward's autocast state.

Activations are named (``ACTIVATIONS`` below): those without parameters. A PReLU's slope would need its
own gradient path; :func:`activation_name` returns ``None`` for it and callers keep the plain layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.ops.grouped import grouped_linear, grouped_linear_backward

__all__ = [
    "ACTIVATIONS",
    "activation_name",
    "autocast_like",
    "autocast_state",
    "norm_act_conv",
    "norm_act_linear",
    "update_running_stats",
]

#: The activations the operators take, by name; ``leaky_relu``'s slope is the ``act_slope`` argument.
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "leaky_relu", "silu", "hardswish")


def activation_name(act: nn.Module) -> tuple[str, float] | None:
    """``(name, slope)`` of a parameter-free activation module for these operators, or ``None``."""
    if isinstance(act, nn.Identity):
        return "none", 0.0
    if isinstance(act, nn.GELU):
        return ("gelu_tanh" if act.approximate == "tanh" else "gelu"), 0.0
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", float(act.negative_slope)
    named = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
    return (named[type(act)], 0.0) if type(act) in named else None


def _channels_last_nodes(z: Tensor) -> tuple[bool, Tensor]:
    """The ``(B, H, W, C)`` view of a channels-last ``(B, C, H, W)`` map (else ``z``): CPU's element-wise
    kernels round GELU differently on the permuted strides, and every other path of the model
    (``activate``) computes it on this contiguous view."""
    if z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return True, z.permute(0, 2, 3, 1)
    return False, z


def _activate(name: str, slope: float, z: Tensor) -> Tensor:
    permuted, nodes = _channels_last_nodes(z)
    if name == "gelu" or name == "gelu_tanh":
        out = F.gelu(nodes, approximate="tanh" if name == "gelu_tanh" else "none")
    elif name == "relu":
        out = F.relu(nodes)
    elif name == "leaky_relu":
        out = F.leaky_relu(nodes, slope)
    elif name == "silu":
        out = F.silu(nodes)
    elif name == "hardswish":
        out = F.hardswish(nodes)
    else:
        return z
    return out.permute(0, 3, 1, 2) if permuted else out


def _activate_backward(name: str, slope: float, grad: Tensor, z: Tensor) -> Tensor:
    aten = torch.ops.aten
    permuted, nodes = _channels_last_nodes(z)
    grad_nodes = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) if permuted else grad
    if name == "gelu" or name == "gelu_tanh":
        out = aten.gelu_backward(grad_nodes, nodes, approximate="tanh" if name == "gelu_tanh" else "none")
    elif name == "relu":
        out = aten.threshold_backward(grad_nodes, nodes, 0)
    elif name == "leaky_relu":
        out = aten.leaky_relu_backward(grad_nodes, nodes, slope, False)
    elif name == "silu":
        out = aten.silu_backward(grad_nodes, nodes)
    elif name == "hardswish":
        out = aten.hardswish_backward(grad_nodes, nodes)
    else:
        return grad
    return out.permute(0, 3, 1, 2) if permuted else out


def autocast_state(t: Tensor) -> tuple[str, bool, torch.dtype]:
    """The autocast state for ``t``'s device, to recompute in backward exactly as forward computed."""
    device = t.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def autocast_like(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    """Re-enter a state from :func:`autocast_state` (backward runs outside the forward's autocast)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} for norm_act operators; choose one of {ACTIVATIONS}")


def _normalize(y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps):
    """``batch_norm(y)`` over the channel axis 1, with the statistics backward needs (empty in eval).
    Batch statistics leave the running ones untouched (the operators are functional)."""
    if batch_stats:
        running_mean = running_var = None
    return torch.native_batch_norm(
        y, norm_weight, norm_bias, running_mean, running_var, batch_stats, 0.0, eps
    )


def update_running_stats(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, invstd: Tensor, y: Tensor,
    momentum: float, eps: float,
) -> None:  # fmt: skip
    """Move the running statistics towards a batch's ``mean`` and ``invstd`` (from the operators), as
    ``nn.BatchNorm`` does: by ``momentum``, with the unbiased variance of the batch ``y``."""
    if running_mean is None or running_var is None or momentum == 0.0:
        return
    n = y.numel() // y.size(1)
    with torch.no_grad():
        var = invstd.double().pow(-2).sub(eps).mul(n / max(n - 1, 1))
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(var.to(running_var.dtype), momentum)


@torch.library.custom_op("vig_pyg::norm_act_linear", mutates_args=())
def norm_act_linear(
    y: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_stats: bool,
    eps: float,
    act: str,
    act_slope: float,
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``grouped_linear(act(batch_norm(y)), weight, bias, groups)`` for ``(rows, C)`` ``y``, and the
    batch statistics (mean, inverse std; empty with ``batch_stats=False``) that backward reuses."""
    _check_activation(act)
    z, mean, invstd = _normalize(y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps)
    return grouped_linear(_activate(act, act_slope, z), weight, bias, groups), mean, invstd


@torch.library.custom_op("vig_pyg::norm_act_conv", mutates_args=())
def norm_act_conv(
    y: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_stats: bool,
    eps: float,
    act: str,
    act_slope: float,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv2d(act(batch_norm(y)), weight, bias, stride, padding)`` for ``(B, C, H, W)`` ``y``, and the
    batch statistics as in :func:`norm_act_linear`."""
    _check_activation(act)
    z, mean, invstd = _normalize(y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps)
    out = F.conv2d(_activate(act, act_slope, z), weight, bias, stride, padding)
    return out, mean, invstd


def _stats_shape(y: Tensor, batch_stats: bool) -> tuple[int]:
    return (y.size(1) if batch_stats else 0,)


@norm_act_linear.register_fake
def _(y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps, act, act_slope,
      weight, bias, groups):  # fmt: skip
    stats = _stats_shape(y, batch_stats)
    return y.new_empty(y.size(0), weight.size(0)), y.new_empty(stats), y.new_empty(stats)


@norm_act_conv.register_fake
def _(y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps, act, act_slope,
      weight, bias, stride, padding):  # fmt: skip
    # The output keeps the input's memory format (channels-last in, channels-last out), as the real one.
    out = torch.empty_like(F.conv2d(torch.empty_like(y), weight, bias, stride, padding))
    stats = _stats_shape(y, batch_stats)
    return out, y.new_empty(stats), y.new_empty(stats)


def _setup(ctx, inputs, output) -> None:
    # Backward runs outside the forward's autocast: it re-enters it to rebuild and differentiate alike.
    ctx.autocast = autocast_state(inputs[0])
    y, norm_weight, norm_bias, running_mean, running_var, batch_stats, eps, act, slope, weight = inputs[:10]
    _, mean, invstd = output
    # Eval normalises with the running statistics: backward needs them (they do not change in eval).
    running = (None, None) if batch_stats else (running_mean, running_var)
    ctx.save_for_backward(y, norm_weight, norm_bias, *running, mean, invstd, weight)
    ctx.batch_stats, ctx.eps, ctx.act, ctx.slope = batch_stats, eps, act, slope
    ctx.has_bias, ctx.layer_args = inputs[10] is not None, inputs[11:]


def _rebuild(ctx):
    """The saved tensors and the activation's input and output, recomputed from ``y``."""
    y, norm_weight, norm_bias, running_mean, running_var, mean, invstd, weight = ctx.saved_tensors
    if ctx.batch_stats:
        shape = (1, -1) + (1,) * (y.dim() - 2)  # per channel, channel axis 1
        z = (y - mean.view(shape)) * invstd.view(shape)
        if norm_weight is not None:
            z = z * norm_weight.view(shape)
        if norm_bias is not None:
            z = z + norm_bias.view(shape)
    else:
        z = F.batch_norm(y, running_mean, running_var, norm_weight, norm_bias, False, 0.0, ctx.eps)
    z = z.to(y.dtype)  # as the forward's batch_norm returned it
    g = _activate(ctx.act, ctx.slope, z)
    return y, norm_weight, norm_bias, running_mean, running_var, mean, invstd, weight, z, g


def _backward_through_norm_act(ctx, saved, grad_g: Tensor):
    y, norm_weight, norm_bias, running_mean, running_var, mean, invstd, _, z, _ = saved
    grad_z = _activate_backward(ctx.act, ctx.slope, grad_g, z)
    mask = [True, norm_weight is not None, norm_bias is not None]
    grad_y, grad_nw, grad_nb = torch.ops.aten.native_batch_norm_backward(
        grad_z, y, norm_weight, running_mean, running_var, mean, invstd, ctx.batch_stats, ctx.eps, mask
    )
    return grad_y, grad_nw if mask[1] else None, grad_nb if mask[2] else None


def _linear_grads(ctx, grad_out: Tensor, g: Tensor, weight: Tensor):
    (groups,) = ctx.layer_args
    return grouped_linear_backward(grad_out.reshape(g.size(0), -1), g, weight, groups)


def _conv_grads(ctx, grad_out: Tensor, g: Tensor, weight: Tensor):
    stride, padding = ctx.layer_args
    return torch.ops.aten.convolution_backward(
        grad_out, g, weight, [weight.size(0)], stride, padding, [1, 1], False, [0, 0], 1,
        [True, True, ctx.has_bias],
    )  # fmt: skip


def _backward(layer_grads, ctx, grad_out: Tensor, _grad_mean, _grad_invstd):
    """Both operators' backward: rebuild the norm + act from ``y``, then the layer's and the norm's
    gradients (``layer_grads``: the layer's input, weight and bias gradients)."""
    with autocast_like(ctx.autocast):
        saved = _rebuild(ctx)
        weight, g = saved[7], saved[9]
        grad_g, grad_w, grad_b = layer_grads(ctx, grad_out, g, weight)
        grad_y, grad_nw, grad_nb = _backward_through_norm_act(ctx, saved, grad_g)
    no_grads = (None,) * 6  # running statistics, batch_stats, eps, act, act_slope
    layer_args = (None,) * len(ctx.layer_args)
    return grad_y, grad_nw, grad_nb, *no_grads, grad_w, grad_b if ctx.has_bias else None, *layer_args


norm_act_linear.register_autograd(functools.partial(_backward, _linear_grads), setup_context=_setup)
norm_act_conv.register_autograd(functools.partial(_backward, _conv_grads), setup_context=_setup)
