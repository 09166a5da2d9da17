"""Training memory: BatchNorm and activation outputs recomputed in backward instead of kept.

In a training step most of a ViG block's activation memory is not the output of its linear layers but
of the cheap element-wise work between them: a BatchNorm keeps its input, the activation keeps the
BatchNorm's output, and the next linear layer keeps the activation's output, three tensors of the same
size for ``norm -> act -> linear``. :func:`norm_act_linear` keeps only the first and recomputes the other
two in backward (one BatchNorm and one activation pass, far cheaper than the linear layer, which is not
recomputed: its weight gradient uses the recomputed input). It is the operator
``vig_pyg::norm_act_linear`` (:mod:`vig_pyg.ops.norm_act`), so eager mode, ``torch.compile`` and
``torch.export`` all run it. The FFN, the stem and the Grapher use it in training (their
``memory_saving`` attribute); results are those of the plain layers (same running-statistics update).

The Grapher's MRConv section goes further: everything from fc1's linear output to fc2's norm is replayed
in backward (:func:`norm_act_linear` with ``recompute_from``, :meth:`vig_pyg.nn.MRConv.replayable`). That
replay is a Python ``autograd.Function`` around the model's own functions, which compilers cannot
capture: :func:`replays_in_backward` confines it to eager autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vig_pyg import ops
from vig_pyg.nn.mlp import activate, grouped_linear, grouped_linear_backward
from vig_pyg.ops.norm_act import (
    ACTIVATIONS,
    activation_name,
    autocast_like,
    autocast_state,
    update_running_stats,
)
from vig_pyg.tracing import is_tracing

__all__ = ["batch_norm_once", "norm_act_conv", "norm_act_linear", "replays_in_backward"]


def replays_in_backward(*tensors: Tensor) -> bool:
    """Whether a section replayed in backward by a Python ``autograd.Function`` (the Grapher's MRConv
    section, :meth:`vig_pyg.nn.MRConv.replayable`) pays here: autograd records through one of ``tensors``,
    in eager mode. Compilers and exporters cannot capture a replaying function; they get the operators."""
    return torch.is_grad_enabled() and not is_tracing() and any(t.requires_grad for t in tensors)


def _momentum(norm: nn.modules.batchnorm._BatchNorm) -> float:
    # The running-average factor nn.BatchNorm uses for this call (and its batch counter update).
    if not (norm.training and norm.track_running_stats):
        return 0.0
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def batch_norm_once(
    norm: nn.modules.batchnorm._BatchNorm, y: Tensor
) -> tuple[Tensor, Callable[[Tensor, Tensor | None, Tensor | None], Tensor]]:
    """``norm(y)`` computed without autograd, and a function that replays it with autograd.

    The running statistics update here exactly as ``norm(y)`` would update them; the replay
    ``replay(y, norm.weight, norm.bias)`` gives the same output with gradients (batch statistics in
    training, the current running statistics in eval) and updates nothing. For callers that rebuild
    ``norm(y)`` in backward instead of keeping it (the Grapher's fc1 norm before MRConv).
    """
    batch_stats = norm.training or not norm.track_running_stats
    use_running = not norm.training or norm.track_running_stats
    momentum = _momentum(norm)
    with torch.no_grad():
        z = F.batch_norm(
            y,
            norm.running_mean if use_running else None,
            norm.running_var if use_running else None,
            norm.weight,
            norm.bias,
            batch_stats,
            momentum,
            norm.eps,
        )
    stats = None if batch_stats else (norm.running_mean.clone(), norm.running_var.clone())
    return z, functools.partial(_replay_batch_norm, stats=stats, eps=norm.eps)


def _replay_batch_norm(y, weight, bias, stats, eps):
    mean, var = stats if stats is not None else (None, None)
    return F.batch_norm(y, mean, var, weight, bias, stats is None, 0.0, eps)


def grouped_linear_grads(grad_out: Tensor, x: Tensor, weight: Tensor, groups: int, dtype: torch.dtype):
    """Input, weight and bias gradients of :func:`grouped_linear`, computed in ``dtype`` (what the forward
    ran in, e.g. bfloat16 under autocast) and returned in the dtypes of ``x`` and ``weight``."""
    grad_x, grad_w, grad_b = grouped_linear_backward(
        grad_out.to(dtype), x.to(dtype), weight.to(dtype), groups
    )
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b.to(weight.dtype)


class _ReplayedNormActLinear(torch.autograd.Function):
    """``grouped_linear(act(batch_norm(producer(*made_from))))`` keeping only ``made_from``: backward
    replays ``producer`` and the norm + act (see :func:`norm_act_linear`'s ``recompute_from``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, norm_weight, norm_bias, running_mean, running_var, batch_stats, momentum, eps, act, weight,
        bias, groups, producer, *made_from,
    ) -> Tensor:  # fmt: skip
        y = producer(*made_from)
        z = F.batch_norm(y, running_mean, running_var, norm_weight, norm_bias, batch_stats, momentum, eps)
        out = grouped_linear(activate(act, z), weight, bias, groups)
        ctx.save_for_backward(norm_weight, norm_bias, weight, *made_from)
        # Eval-mode statistics are needed again in backward; batch statistics are recomputed from y.
        ctx.stats = None if batch_stats else (running_mean.clone(), running_var.clone())
        ctx.act, ctx.groups, ctx.eps, ctx.has_bias = act, groups, eps, bias is not None
        ctx.producer, ctx.autocast, ctx.dtype = producer, autocast_state(weight), out.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        norm_weight, norm_bias, weight, *kept = ctx.saved_tensors
        kept_inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in kept]
        params = [t.detach().requires_grad_() if t is not None else None for t in (norm_weight, norm_bias)]
        mean, var = ctx.stats if ctx.stats is not None else (None, None)
        with torch.enable_grad(), autocast_like(ctx.autocast):
            y = ctx.producer(*kept_inputs)
            z = F.batch_norm(y, mean, var, params[0], params[1], ctx.stats is None, 0.0, ctx.eps)
            g = activate(ctx.act, z)
        grad_g, grad_w, grad_b = grouped_linear_grads(grad_out, g.detach(), weight, ctx.groups, ctx.dtype)
        inputs = kept_inputs + params
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(g, wanted, grad_g, allow_unused=True))
        grad_kept = [next(grads) if t is not None and t.requires_grad else None for t in kept_inputs]
        grad_nw, grad_nb = (next(grads) if t is not None else None for t in params)
        grad_b = grad_b if ctx.has_bias else None
        return grad_nw, grad_nb, None, None, None, None, None, None, grad_w, grad_b, None, None, *grad_kept


def _norm_inputs(norm: nn.modules.batchnorm._BatchNorm) -> tuple:
    """A BatchNorm's arguments to the ``norm_act`` operators and its momentum for this call, as its own
    forward would use them (its batch counter advances here, as in ``nn.BatchNorm``)."""
    batch_stats = norm.training or not norm.track_running_stats
    use_running = not norm.training or norm.track_running_stats
    running = (norm.running_mean, norm.running_var) if use_running else (None, None)
    return (norm.weight, norm.bias, *running, batch_stats, norm.eps), _momentum(norm)


def _norm_act(op, y: Tensor, norm: nn.modules.batchnorm._BatchNorm, act: nn.Module, *layer) -> Tensor:
    norm_args, momentum = _norm_inputs(norm)
    out, mean, invstd = op(y, *norm_args, *_activation(act), *layer)
    if norm_args[4]:  # batch statistics: the running ones follow them, as in nn.BatchNorm
        update_running_stats(norm_args[2], norm_args[3], mean, invstd, y, momentum, norm.eps)
    return out


def _activation(act: nn.Module) -> tuple[str, float]:
    named = activation_name(act)
    if named is None:
        raise ValueError(
            "norm_act_linear / norm_act_conv take an activation without parameters "
            f"({', '.join(ACTIVATIONS)}), got {type(act).__name__}; use the plain layers for it"
        )
    return named


def norm_act_linear(
    y: Tensor | None,
    norm: nn.modules.batchnorm._BatchNorm,
    act: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    groups: int = 1,
    recompute_from: tuple[Callable[..., Tensor], Sequence[Tensor | None]] | None = None,
) -> Tensor:
    """``linear(act(norm(y)))`` keeping only ``y`` for backward: operator ``vig_pyg::norm_act_linear``
    (:mod:`vig_pyg.ops.norm_act`).

    With ``recompute_from=(fn, tensors)`` and ``y=None``, ``y`` is ``fn(*tensors)`` and is not kept
    either: backward replays ``fn`` (which must be a pure function of ``tensors``: every tensor that needs
    a gradient, weights included, passed in, and no running statistics updated). The Grapher rebuilds
    MRConv's output this way (:meth:`vig_pyg.nn.MRConv.replayable`).

    Args:
        y: ``(rows, C)`` pre-norm features (channels last).
        norm: the BatchNorm (any ``nn.BatchNorm*d``; its running statistics update as its own forward
            would).
        act: an activation without parameters.
        weight, bias: the linear layer, ``(Cout, C / groups)`` and ``(Cout,)``.
        groups: channel groups of the linear layer (see :func:`vig_pyg.nn.mlp.grouped_linear`).

    Returns:
        ``(rows, Cout)``.
    """
    if (y is None) == (recompute_from is None):
        raise ValueError("norm_act_linear takes either y or recompute_from=(fn, tensors), not both")
    if y is not None and y.dim() != 2:
        raise ValueError(f"norm_act_linear takes (rows, channels) features, got shape {tuple(y.shape)}")
    if recompute_from is not None:
        norm_args, momentum = _norm_inputs(norm)
        nw, nb, running_mean, running_var, batch_stats, eps = norm_args
        producer, made_from = recompute_from
        return _ReplayedNormActLinear.apply(
            nw, nb, running_mean, running_var, batch_stats, momentum, eps, act, weight, bias, groups,
            producer, *made_from,
        )  # fmt: skip
    return _norm_act(ops.norm_act_linear, y, norm, act, weight, bias, groups)


def norm_act_conv(
    y: Tensor, norm: nn.modules.batchnorm._BatchNorm, act: nn.Module, conv: nn.Conv2d
) -> Tensor:
    """``conv(act(norm(y)))`` keeping only ``y`` for backward: operator ``vig_pyg::norm_act_conv`` for a
    ``(B, C, H, W)`` map and an ``nn.Conv2d`` (no groups or dilation, zero padding), e.g. in the stem."""
    if y.dim() != 4:
        raise ValueError(f"norm_act_conv takes (B, C, H, W) maps, got shape {tuple(y.shape)}")
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("norm_act_conv supports plain convolutions: groups=1, dilation=1, zero padding")
    stride, padding = list(conv.stride), list(conv.padding)
    return _norm_act(ops.norm_act_conv, y, norm, act, conv.weight, conv.bias, stride, padding)
