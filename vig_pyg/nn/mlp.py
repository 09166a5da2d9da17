"""The small MLP inside every ViG graph convolution.

The official ``BasicConv`` is a 1x1 ``Conv2d`` with ``groups=4``, then BatchNorm, then an activation,
applied to ``(B, C, N, 1)`` maps. On node features ``(N, C)`` that is a grouped linear layer: input
channel quarter ``g`` feeds only output channel quarter ``g``. The weights keep the official shape
``(out, in / groups)`` (less the two trailing 1x1 axes), so checkpoints convert by a reshape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from vig_pyg.ops.grouped import grouped_linear, grouped_linear_backward

__all__ = [
    "ACTIVATIONS",
    "GroupedLinear",
    "GroupedMLP",
    "activate",
    "fold_batch_norm",
    "fold_pays",
    "grouped_linear",
    "grouped_linear_backward",
    "make_activation",
    "normalize_output",
    "residual_add",
]

ACTIVATIONS = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.2),
    "prelu": nn.PReLU,
    "hswish": nn.Hardswish,
    "silu": nn.SiLU,
}


def make_activation(name: str | None) -> nn.Module:
    """An activation module by name (``None`` or ``"none"`` gives identity)."""
    if name is None or name == "none":
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


def _recording(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def activate(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)``; in place when autograd is not recording and ``x`` is a fresh intermediate.

    Large fresh outputs cost page faults on CPU (the allocator hands big blocks back to the OS), so in
    inference the activation overwrites its input instead. Callers pass only tensors nobody else holds.
    GELU on a channels-last map runs on the contiguous ``(B, H, W, C)`` view of the same memory: CPU's
    exact GELU measured 2x slower (more with large inputs) on the permuted ``(B, C, H, W)`` strides, and
    the two kernels round differently, so eager, compiled and exported models all take this one.
    """
    if isinstance(act, nn.GELU):
        channels_last = (
            x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        )
        nodes = x.permute(0, 2, 3, 1) if channels_last else x
        if not _recording(x):
            torch.ops.aten.gelu_(nodes, approximate=act.approximate)
            return x
        out = F.gelu(nodes, approximate=act.approximate)
        return out.permute(0, 3, 1, 2) if channels_last else out
    if _recording(x):
        return act(x)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    return act(x)


def residual_add(branch: Tensor, shortcut: Tensor) -> Tensor:
    """``branch + shortcut``, accumulated into ``branch`` (a fresh intermediate) when not recording."""
    if _recording(branch) or _recording(shortcut):
        return branch + shortcut
    return branch.add_(shortcut)


def fold_batch_norm(
    weight: Tensor, bias: Tensor | None, norm: nn.modules.batchnorm._BatchNorm, trailing_dims: int = 1
) -> tuple[Tensor, Tensor]:
    """Weights of ``norm(layer(x))`` as one layer, for a BatchNorm using its running statistics.

    ``weight`` has the output channels first and ``trailing_dims`` more axes (1 for a linear layer, 3 for
    a 2-D conv; passed in rather than read off the tensor so that FX can trace it). The result computes
    the same function up to float rounding, with one pass over the output instead of two.
    """
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return weight * scale.view((-1,) + (1,) * trailing_dims), shift


def fold_pays(weight: Tensor, output_elements: int) -> bool:
    """Whether an eval-mode BatchNorm is cheaper folded into ``weight`` than applied to the output.

    Folding rewrites the weight on every call; normalising rewrites the output. Late layers at small
    batches have far larger weights than outputs (Pyramid ViG's last downsampling conv at batch 1: 2.3 M
    weights for 31 k outputs), early layers the reverse. Sizes a trace cannot decide on (a dynamic batch
    under ``torch.export``, a ragged graph's edge count) fold, which needs no guard on them.
    """
    if not isinstance(output_elements, int):  # a SymInt (torch.export) or an FX proxy
        return True
    return guard_or_true(weight.numel() <= output_elements)  # dynamo's unbacked sizes look like ints


def normalize_output(y: Tensor, norm: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """Eval-mode ``norm`` on ``y`` whose last axis holds the channels (a node view ``(..., C)``)."""
    flat = y.reshape(-1, y.size(-1))  # (rows, C): BatchNorm1d's layout, a view
    return F.batch_norm(
        flat, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
    ).view_as(y)


class GroupedLinear(nn.Module):
    """A linear layer whose channels are split into ``groups`` independent blocks (a grouped 1x1 conv).

    Args:
        in_channels: input width, divisible by ``groups``.
        out_channels: output width, divisible by ``groups``.
        groups: number of channel blocks.
        bias: add a learnable bias.

    Shapes:
        input ``(*, in_channels)``; output ``(*, out_channels)``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 4, bias: bool = True) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be divisible by "
                f"groups ({groups}); choose widths that are multiples of {groups} or pass groups=1"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming normal over fan_in = in / groups with zero bias, the official initialisation.
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / self.weight.size(1)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = grouped_linear(x.reshape(-1, self.in_channels), self.weight, self.bias, self.groups)
        return out.view(*lead, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, groups={self.groups}, bias={self.bias is not None}"


class GroupedMLP(nn.Sequential):
    """``GroupedLinear -> BatchNorm -> activation``, the official ``BasicConv`` on node features.

    Args:
        in_channels: input width.
        out_channels: output width.
        groups: channel blocks of the linear layer (4 in every official model).
        act: activation name (``"gelu"`` officially).
        norm: ``"batch"`` (BatchNorm over all nodes, as BatchNorm2d over ``(B, C, N, 1)``) or ``None``.
        bias: bias in the linear layer.
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
        if norm not in ("batch", None):
            raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
        super().__init__()
        self.lin = GroupedLinear(in_channels, out_channels, groups, bias)
        self.norm = nn.BatchNorm1d(out_channels) if norm == "batch" else nn.Identity()
        self.act = make_activation(act)

    def reset_parameters(self) -> None:
        self.lin.reset_parameters()
        if isinstance(self.norm, nn.BatchNorm1d):
            self.norm.reset_parameters()

    def forward(self, x: Tensor, pre_norm: bool = False) -> Tensor:
        """``act(norm(lin(x)))``; with ``pre_norm=True`` only ``lin(x)`` (see :meth:`norm_act`).

        ``pre_norm`` lets a caller fuse the norm and activation with its own next layer
        (:func:`vig_pyg.nn.recompute.norm_act_linear`).
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, x.size(-1))  # (rows, C): BatchNorm1d's layout
        if pre_norm:
            return self.lin(x).reshape(*lead, -1)
        if isinstance(self.norm, nn.BatchNorm1d) and not self.norm.training:
            # Eval: the BatchNorm is an affine map, applied where it costs less (see fold_pays).
            if fold_pays(self.lin.weight, x.size(0) * self.lin.out_channels):
                weight, bias = fold_batch_norm(self.lin.weight, self.lin.bias, self.norm)
                x = grouped_linear(x, weight, bias, self.lin.groups)
            else:
                x = normalize_output(self.lin(x), self.norm)
        else:
            x = self.norm(self.lin(x))
        return activate(self.act, x).reshape(*lead, -1)

    def norm_act(self, x: Tensor) -> Tensor:
        """The rest of :meth:`forward` after ``pre_norm=True``: ``act(norm(x))``."""
        return activate(self.act, self.norm(x))
