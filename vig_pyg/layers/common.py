"""Small building blocks shared by both model families: conv + norm, drop path, stem, classifier head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.nn.mlp import activate, fold_batch_norm, fold_pays, make_activation, normalize_output
from vig_pyg.nn.recompute import norm_act_conv
from vig_pyg.ops.norm_act import activation_name
from vig_pyg.tuning import GemmChoice

__all__ = ["ClassifierHead", "ConvNorm", "DistilledClassifierHead", "DropPath", "HeadBatchNorm", "Stem"]

# FX records activate() as one call (it looks at the tensor's layout), so traced models run its kernels.
torch.fx.wrap("activate")


class ConvNorm(nn.Module):
    """``Conv2d -> BatchNorm2d``, no activation (ViG's fc layers, downsample and stem convs).

    A 1x1 conv (every fc layer) is one GEMM over the nodes of the channels-last map, run either as
    ``F.linear`` on its free node view ``(B, H, W, C)`` or as a 1x1 convolution: ``gemm`` says which, in
    eval and in training (:mod:`vig_pyg.tuning` measures which is faster on the running machine when a
    model is built with ``gemm="auto"``). The output is a channels-last ``(B, C, H, W)`` map either way.
    In eval mode the BatchNorm is folded into the weights on the fly (one pass instead of two). The
    parameters keep ``Conv2d``'s shapes, so checkpoints are unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels)
        self.pointwise = kernel_size == 1 and stride == 1
        self.gemm = GemmChoice()

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.conv.weight, self.conv.bias
        # Eval: the BatchNorm is folded into the weights, or applied to the output where that is smaller.
        evaluating = not self.norm.training
        normalize = evaluating and not fold_pays(weight, self._output_elements(x))
        if evaluating and not normalize:
            weight, bias = fold_batch_norm(weight, bias, self.norm, trailing_dims=3)
        if self.pointwise:
            nodes = self._gemm(x, weight, bias, self.gemm.train if self.training else self.gemm.eval)
        else:
            nodes = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding).permute(0, 2, 3, 1)
        if normalize:
            nodes = normalize_output(nodes, self.norm)
        x = nodes.permute(0, 3, 1, 2)
        return self.norm(x) if self.norm.training else x

    def _output_elements(self, x: Tensor) -> int:
        (kh, kw), (sh, sw), (ph, pw) = self.conv.kernel_size, self.conv.stride, self.conv.padding
        h, w = (x.size(2) + 2 * ph - kh) // sh + 1, (x.size(3) + 2 * pw - kw) // sw + 1
        return x.size(0) * h * w * self.conv.out_channels

    @staticmethod
    def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: str) -> Tensor:
        """``(B, C, H, W)`` channels-last ``-> (B, H, W, Cout)``, both node views (no copies)."""
        if kernel == "conv":  # a channels-last input gives a channels-last output
            x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, weight, bias).permute(0, 2, 3, 1)
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)

    def project(self, x: Tensor) -> Tensor:
        """A pointwise layer's linear map alone, no norm (training): ``(B, C, H, W) -> (B, H, W, Cout)``."""
        return self._gemm(x, self.conv.weight, self.conv.bias, self.gemm.train)

    def extra_repr(self) -> str:
        return f"gemm={self.gemm}" if self.pointwise else ""


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.size(0),) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Stem(nn.Module):
    """A stack of 3x3 ``ConvNorm`` layers with an activation between them (and after the last with
    ``act_last``, as MobileViG's and GreedyViG's stems have it).

    Args:
        in_channels: image channels.
        widths: output channels of each conv.
        strides: stride of each conv.
        act: activation name.
        act_last: an activation after the last conv too.

    In training, each norm + activation runs with the next conv as one operator that keeps only its input
    for backward (:func:`vig_pyg.nn.recompute.norm_act_conv`); ``memory_saving`` says whether.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        strides: Sequence[int],
        act: str = "gelu",
        act_last: bool = False,
    ) -> None:
        super().__init__()
        self.act_last = act_last
        if len(widths) != len(strides):
            raise ValueError("the stem needs one stride per conv")
        chans = [in_channels, *widths]
        self.layers = nn.ModuleList(
            ConvNorm(chans[i], chans[i + 1], 3, strides[i]) for i in range(len(widths))
        )
        self.act = make_activation(act)
        self.stride = math.prod(strides)
        self.supports_memory_saving = len(widths) > 1 and activation_name(self.act) is not None
        self.memory_saving = self.supports_memory_saving

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.memory_saving:
            # Training: each norm + act with the next conv as one operator that keeps only the conv output
            # before it (vig_pyg.nn.recompute): at 1/2 and 1/4 resolution these maps are large.
            x = self.layers[0].conv(x)
            for prev, layer in zip(self.layers[:-1], self.layers[1:]):
                x = norm_act_conv(x, prev.norm, self.act, layer.conv)
            x = self.layers[-1].norm(x)
            return self.act(x) if self.act_last else x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.act_last:
                x = activate(self.act, x)
        return x

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}"


class HeadBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` that also accepts a training batch of one image.

    The head normalises pooled ``(B, C)`` features, where a batch of one has no variance to normalise
    by (``nn.BatchNorm1d`` raises). Such a batch is normalised with the running statistics instead, as in
    eval mode, and leaves them unchanged; every larger batch trains as usual.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.size(0) == 1:
            stats = self.running_mean, self.running_var
            return F.batch_norm(x, *stats, self.weight, self.bias, training=False, eps=self.eps)
        return super().forward(x)


class ClassifierHead(nn.Module):
    """Global average pool, ``Linear -> BatchNorm -> act -> dropout`` to ``hidden`` features, classifier.

    ViG's head: the official 1x1 convs on a pooled ``(B, C, 1, 1)`` map are linear layers.
    """

    def __init__(
        self, in_channels: int, hidden: int, num_classes: int, act: str = "gelu", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(in_channels, hidden)
        self.norm = HeadBatchNorm(hidden)
        self.act = make_activation(act)
        self.drop = nn.Dropout(drop_rate)
        self.classifier: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"num_classes must be an int >= 0 (0 removes the classifier), got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        x = self.drop(self.act(self.norm(self.fc(x))))
        return x if pre_logits else self.classifier(x)


class DistilledClassifierHead(ClassifierHead):
    """:class:`ClassifierHead` with a second classifier for distillation (DeiT-style, as MobileViG and
    GreedyViG are trained): the output is the average of the two (how the authors evaluate); in training
    with ``distilled_training`` the pair ``(classifier, dist_classifier)``, for a distillation loss.
    ``distillation=False`` has no second classifier (fine-tuning)."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        num_classes: int,
        act: str = "gelu",
        drop_rate: float = 0.0,
        distillation: bool = True,
    ) -> None:
        self.distillation = distillation
        self.distilled_training = False
        super().__init__(in_channels, hidden, num_classes, act, drop_rate)

    def reset(self, num_classes: int) -> None:
        super().reset(num_classes)
        has_second = self.distillation and num_classes > 0
        self.dist_classifier = nn.Linear(self.hidden, num_classes) if has_second else None

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = super().forward(x, pre_logits=True)
        if pre_logits:
            return x
        out = self.classifier(x)
        if self.dist_classifier is None:
            return out
        dist = self.dist_classifier(x)
        if self.training and self.distilled_training:
            return out, dist
        return (out + dist) / 2
