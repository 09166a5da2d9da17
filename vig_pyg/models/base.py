"""What both ViG families share: the stage container and the timm model contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vig_pyg.layers.blocks import FFN, Grapher
from vig_pyg.layers.common import ClassifierHead, ConvNorm, Stem
from vig_pyg.nn.mlp import GroupedLinear

__all__ = [
    "FeatureExtractor",
    "ViGModel",
    "ViGStage",
    "add_position_embedding",
    "ceil_div",
    "check_positive_ints",
    "image_size_pair",
    "per_block",
    "per_block_ints",
]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_ints(
    name: str, values: int | Sequence[int], count: int | None = None, entries: str = "one per stage"
) -> tuple[int, ...]:
    """``values`` as a tuple, refusing anything but positive ints (and another length than ``count``).

    ``count=None`` asks for a single int (returned as a 1-tuple).
    """
    items = (values,) if count is None else values
    if not isinstance(items, Sequence) or isinstance(items, str) or not all(map(_is_positive_int, items)):
        what = "a positive int" if count is None else f"{count} positive ints ({entries})"
        raise ValueError(f"{name} must be {what}, got {values!r}")
    if count is not None and len(items) != count:
        raise ValueError(f"{name} needs {count} entries ({entries}), got {len(items)}: {tuple(items)}")
    return tuple(items)


def per_block(name: str, value: Any, count: int, kind: type | tuple[type, ...]) -> list[Any]:
    """``value`` for each of ``count`` graph blocks: one value for all, or a sequence of ``count`` values.

    ``kind`` is the type of one value (``int`` for ``k``, ``dict`` for ``graph_kwargs``)."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return [value] * count
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != count or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise ValueError(
                f"{name} takes one value for every graph block or a sequence of {count} (one per block), "
                f"got {value!r}"
            )
        return values
    raise ValueError(f"{name} takes one value for every graph block or a sequence of {count}, got {value!r}")


def per_block_ints(name: str, value: int | Sequence[int], count: int) -> list[int]:
    """A positive int for each of ``count`` graph blocks: one for all, or a sequence of ``count``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(check_positive_ints(name, value, count=count, entries="one per graph block"))
    return list(check_positive_ints(name, value)) * count


def image_size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``img_size`` as ``(height, width)``: an int for a square, or a pair of positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"img_size must be a positive int or a (height, width) pair, got {size!r}")
        return size, size
    return check_positive_ints("img_size", size, count=2, entries="height, width")  # type: ignore[return-value]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def add_position_embedding(x: Tensor, pos_embed: Tensor) -> Tensor:
    """``x + pos_embed``, the embedding bicubic-resized first when the grids differ (other input sizes).

    A leaf for ``torch.fx`` (see ``torch.fx.wrap`` below): its branch is on static shapes, which symbolic
    tracing cannot evaluate.
    """
    if pos_embed.shape[-2:] != x.shape[-2:]:
        pos_embed = F.interpolate(pos_embed, size=x.shape[-2:], mode="bicubic", align_corners=False)
    # The trunk runs on channels-last maps, whose node view (B, H, W, C) is free (see ConvNorm).
    return (x + pos_embed).contiguous(memory_format=torch.channels_last)


torch.fx.wrap("add_position_embedding")


class ViGStage(nn.Module):
    """An optional stride-2 downsample followed by a sequence of blocks."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


def _take_indices(num: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's convention: ``None``: all, an int ``n``: the last ``n``, a sequence: those (negatives ok)."""
    if indices is None:
        return list(range(num))
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num} feature levels")
        return list(range(num - indices, num))
    out = []
    for i in indices:
        j = i + num if i < 0 else i
        if not 0 <= j < num:
            raise ValueError(f"feature index {i} is out of range for {num} feature levels")
        out.append(j)
    return out


class ViGModel(nn.Module):
    """The timm model contract on top of ``stem -> (+ pos_embed) -> feature levels -> head``.

    Subclasses define ``stem``, ``pos_embed``, ``head``, ``feature_info`` and ``_levels()`` (the modules
    whose outputs are the feature levels, in order).
    """

    head: ClassifierHead
    pos_embed: nn.Parameter
    stem: nn.Module
    feature_info: list[dict[str, Any]]
    num_features: int
    in_chans: int
    min_input_size: tuple[int, int]
    grad_checkpointing: bool = False
    default_out_indices: tuple[int, ...]

    # -- construction helpers -------------------------------------------------------------------------
    def _init_weights(self) -> None:
        # The official initialisation: Kaiming normal (fan in) for every conv/linear, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedLinear):
                m.reset_parameters()

    def _levels(self) -> list[nn.Module]:
        raise NotImplementedError

    def _block_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The patch grid of every Grapher, in order, for an input of ``height x width``."""
        raise NotImplementedError

    def graphers(self) -> list[Grapher]:
        """The model's Graphers in order."""
        return [m for m in self.modules() if isinstance(m, Grapher)]

    def graph_sizes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(query nodes, key nodes, fewest key nodes its builder needs)`` of every Grapher for an input
        of ``height x width`` (the last is ``k`` for builders with a ``k``)."""
        sizes = []
        for grapher, (h, w) in zip(self.graphers(), self._block_grids(height, width)):
            kh, kw = grapher.graph.key_grid(h, w)
            sizes.append((h * w, kh * kw, grapher.graph.min_keys))
        return sizes

    def _fits(self, height: int, width: int) -> bool:
        return all(keys >= k for _, keys, k in self.graph_sizes(height, width))

    def _smallest_square(self, limit: int) -> tuple[int, int]:
        for side in range(1, limit + 1):
            if self._fits(side, side):
                return side, side
        raise ValueError(f"this configuration cannot run even at {limit}x{limit}: lower k or raise img_size")

    # -- inputs ---------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected an image tensor (B, {self.in_chans}, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {x.dtype}; convert with x.float()")
        if x.dim() != 4 or x.size(1) != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if not self._fits(x.size(2), x.size(3)):
            min_h, min_w = self.min_input_size
            raise ValueError(
                f"input {x.size(2)}x{x.size(3)} is too small for this model: a graph block would have fewer "
                f"key nodes than neighbours; the smallest square input is {min_h}x{min_w}"
            )

    def _embed(self, x: Tensor) -> Tensor:
        if not torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # FX proxies have no values to check
            self._check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return add_position_embedding(self.stem(x), self.pos_embed)

    # -- timm contract --------------------------------------------------------------------------------
    def _run_level(self, level: nn.Module, x: Tensor) -> Tensor:
        # Stages checkpoint block by block themselves; bare blocks (isotropic levels) are wrapped here.
        if self.grad_checkpointing and not isinstance(level, ViGStage) and torch.is_grad_enabled():
            return checkpoint(level, x, use_reentrant=False)
        return level(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._embed(x)
        for level in self._levels():
            x = self._run_level(level, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"ViG pools by average only; got global_pool={global_pool!r}")
        self.head.reset(num_classes)
        self.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, ViGStage):
                m.grad_checkpointing = enable

    def set_memory_saving(self, enable: bool = True) -> None:
        """Switch the training-memory operators of every block and the stem on (the default, where a
        layer supports them) or off (every intermediate kept for backward, e.g. to compare); see
        :mod:`vig_pyg.nn.recompute`. Each module's ``memory_saving`` shows in the model's ``repr``."""
        for m in self.modules():
            if isinstance(m, (Stem, Grapher, FFN)):
                m.memory_saving = enable and m.supports_memory_saving

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Feature maps of the chosen levels (timm's signature).

        Args:
            x: images.
            indices: ``None`` for all levels, ``n`` for the last ``n``, or a sequence of level indices.
            norm: accepted for compatibility; ViG has no final norm, so it changes nothing.
            stop_early: stop after the last requested level (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of feature maps.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        levels = self._levels()
        take = _take_indices(len(levels), indices)
        last = max(take) if (stop_early or intermediates_only) and take else len(levels) - 1
        out = []
        x = self._embed(x)
        for i, level in enumerate(levels[: last + 1]):
            x = self._run_level(level, x)
            if i in take:
                out.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return out
        return x, out


class FeatureExtractor(nn.Module):
    """``features_only=True``: returns the chosen feature levels of a ViG model as a list."""

    def __init__(self, model: ViGModel, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.out_indices = _take_indices(len(model.feature_info), list(out_indices))
        model.head = nn.Identity()  # type: ignore[assignment]  # features only: drop the classifier's weights
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)  # type: ignore[return-value]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def downsample(in_channels: int, out_channels: int) -> ConvNorm:
    """Pyramid ViG's stride-2 3x3 conv + BatchNorm between stages (no activation)."""
    return ConvNorm(in_channels, out_channels, kernel_size=3, stride=2)
