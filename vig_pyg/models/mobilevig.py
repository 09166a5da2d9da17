"""MobileViG: inverted-residual stages at strides 4, 8, 16, then Grapher + FFN blocks on a static axial graph.

Paper: "MobileViG: Graph-Based Sparse Attention for Mobile Vision Applications", Munir et al., CVPRW 2023
(https://arxiv.org/abs/2307.00395). Original code and weights: https://github.com/SLDGroup/MobileViG
(Apache-2.0), weights on the Hugging Face hub (``SLDGroup/MobileViG``).

The graph blocks are vig_pyg's Grapher and FFN with the ``svga`` builder (every K-th node along the row and
the column, wrapping around) and the concatenating max-relative conv with MobileViG's sign (centre minus
neighbour, zero start = the self loop): ``graph="svga", conv="mr_concat", conv_kwargs={"sign": -1}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vig_pyg.layers.blocks import ViGBlock
from vig_pyg.layers.common import DistilledClassifierHead, DropPath, Stem
from vig_pyg.models.base import ViGModel, ViGStage, ceil_div, check_positive_ints, downsample
from vig_pyg.models.registry import register_model
from vig_pyg.nn.mlp import make_activation
from vig_pyg.tuning import set_gemm

__all__ = ["InvertedResidual", "MobileViG"]


class _InvertedMLP(nn.Module):
    """``fc1 (C -> 4C), norm, act, depthwise 3x3, norm, act, fc2 (4C -> C), norm`` (official names)."""

    def __init__(self, channels: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.mid_norm = nn.BatchNorm2d(hidden)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(channels)
        self.act = make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.mid_norm(self.mid(x)))
        return self.norm2(self.fc2(x))


class InvertedResidual(nn.Module):
    """``x + drop_path(layer_scale * mlp(x))``: MobileViG's local block."""

    def __init__(self, channels: int, act: str = "gelu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.mlp = _InvertedMLP(channels, 4 * channels, act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_2 = nn.Parameter(torch.full((channels, 1, 1), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class MobileViG(ViGModel):
    """MobileViG-Ti/S/M/B: a 2-conv stem to a 1/4 grid, three stages of inverted residuals, then graph
    blocks at 1/32 on MobileViG's static axial graph (SVGA), and a distilled head.

    Args:
        local_blocks: inverted residual blocks of the three local stages.
        local_channels: their widths.
        global_blocks: graph blocks of each global stage.
        global_channels: their widths.
        emb_dims: width of the head's hidden layer.
        K: the axial graph's step.
        num_classes: classifier outputs (0 for none).
        distillation: a second classifier (``dist_head``); in eval, and in training unless
            :meth:`set_distilled_training`, the output is the average of the two, as the authors evaluate.
        img_size: the input size the model is planned for.
        in_chans: image channels.
        act: activation.
        drop_rate: dropout before the classifier (the official ``dropout``).
        drop_path_rate: stochastic depth, rising linearly over all blocks (the official ``drop_path``).
        graph, graph_kwargs, conv, conv_kwargs: the graph blocks' builder and conv (MobileViG's by default).
        gemm: the pointwise layers' GEMM (see :class:`vig_pyg.models.PyramidViG`).
    """

    def __init__(
        self,
        local_blocks: Sequence[int] = (2, 2, 6),
        local_channels: Sequence[int] = (42, 84, 168),
        global_blocks: Sequence[int] = (2,),
        global_channels: Sequence[int] = (256,),
        emb_dims: int = 512,
        K: int = 2,  # the official argument name
        num_classes: int = 1000,
        distillation: bool = True,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        act: str = "gelu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        graph: Any = "svga",
        graph_kwargs: dict[str, Any] | None = None,
        conv: Any = "mr_concat",
        conv_kwargs: dict[str, Any] | None = None,
        gemm: str = "auto",
        dropout: float | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__()
        local_blocks = check_positive_ints(
            "local_blocks", local_blocks, count=3, entries="one per local stage"
        )
        local_channels = check_positive_ints("local_channels", local_channels, count=3)
        global_blocks = check_positive_ints(
            "global_blocks", global_blocks, count=len(global_blocks), entries="one per global stage"
        )
        global_channels = check_positive_ints("global_channels", global_channels, count=len(global_blocks))
        (emb_dims,), (K,) = check_positive_ints("emb_dims", emb_dims), check_positive_ints("K", K)
        drop_rate = dropout if dropout is not None else drop_rate  # the official names
        drop_path_rate = drop_path if drop_path is not None else drop_path_rate
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = global_channels[-1]
        self.head_hidden_size = emb_dims
        self.local_blocks, self.global_blocks = local_blocks, global_blocks
        self.pos_embed = None  # type: ignore[assignment]  # MobileViG has none
        total = sum(local_blocks) + sum(global_blocks)
        dpr = iter(torch.linspace(0, drop_path_rate, total, device="cpu").tolist())

        c0 = local_channels[0]
        self.stem = Stem(in_chans, (c0 // 2, c0), (2, 2), act, act_last=True)
        stages, widths = [], [*local_channels, *global_channels]
        for s, (width, depth) in enumerate(zip(local_channels, local_blocks)):
            blocks = [InvertedResidual(width, act, next(dpr)) for _ in range(depth)]
            stages.append(ViGStage(blocks, downsample(widths[s - 1], width) if s > 0 else None))
        options = {
            "graph": graph,
            "graph_kwargs": {"K": K} if graph_kwargs is None and graph == "svga" else graph_kwargs,
            "conv": conv,
            "conv_kwargs": {"sign": -1} if conv_kwargs is None and conv == "mr_concat" else conv_kwargs,
            "groups": 1,
        }
        for g, (width, depth) in enumerate(zip(global_channels, global_blocks)):
            s = len(local_channels) + g
            blocks = [ViGBlock(width, act=act, drop_path=next(dpr), **options) for _ in range(depth)]
            stages.append(ViGStage(blocks, downsample(widths[s - 1], width)))
        self.stages = nn.ModuleList(stages)
        self.head = DistilledClassifierHead(
            global_channels[-1], emb_dims, num_classes, act, drop_rate, distillation
        )
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**s, module=f"stages.{s}") for s, c in enumerate(widths)
        ]
        self.default_out_indices = tuple(range(len(widths)))[-4:]
        self.min_input_size = self._smallest_square(max(self.img_size))
        self._init_weights()
        set_gemm(self, gemm)

    def _init_weights(self) -> None:
        super()._init_weights()
        for m in self.modules():  # the official initialisation of the layer scales
            if isinstance(m, InvertedResidual):
                nn.init.constant_(m.layer_scale_2, 1e-5)

    def _embed(self, x: Tensor) -> Tensor:
        if not torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # FX proxies have no values to check
            self._check_input(x)
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def _levels(self) -> list[nn.Module]:
        return list(self.stages)

    def _block_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        h, w = ceil_div(ceil_div(height, 2), 2), ceil_div(ceil_div(width, 2), 2)
        grids = []
        for s, stage in enumerate(self.stages):
            if s > 0:
                h, w = ceil_div(h, 2), ceil_div(w, 2)
            grids += [(h, w)] * sum(1 for b in stage.blocks if isinstance(b, ViGBlock))
        return grids

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training, return ``(head, dist_head)`` logits (a distillation loss) instead of their mean."""
        self.head.distilled_training = enable

    def official_key_map(self) -> dict[str, str]:
        """vig_pyg key -> key of the official MobileViG code, for every entry of the state dict."""
        prefixes: list[tuple[str, str, str]] = [("stem.", "stem.", "stem"), ("head.", "", "head")]
        local, flat = len(self.local_blocks), 0
        for s, stage in enumerate(self.stages):
            where = "local_backbone" if s < local else "backbone"
            if s == local:
                # The last local stage's downsample to the graph blocks' width ends local_backbone.
                prefixes.append((f"stages.{s}.downsample.", f"local_backbone.{flat}.", "downsample"))
                flat = 0
            elif s > 0:
                prefixes.append((f"stages.{s}.downsample.", f"{where}.{flat}.", "downsample"))
                flat += 1
            for j, block in enumerate(stage.blocks):
                kind = "graph" if isinstance(block, ViGBlock) else "local"
                prefixes.append((f"stages.{s}.blocks.{j}.", f"{where}.{flat}.", kind))
                flat += 1
        return _map_keys(self.state_dict(), prefixes)


_RENAMES = {
    "stem": {"layers.0.conv.": "stem.0.", "layers.0.norm.": "stem.1.", "layers.1.conv.": "stem.3.",
             "layers.1.norm.": "stem.4."},
    "head": {"fc.": "prediction.1.", "norm.": "prediction.2.", "classifier.": "head.",
             "dist_classifier.": "dist_head."},
    "downsample": {"conv.": "conv.0.", "norm.": "conv.1."},
    "local": {"": ""},
    "graph": {"grapher.fc1.conv.": "0.fc1.0.", "grapher.fc1.norm.": "0.fc1.1.",
              "grapher.graph_conv.nn.lin.": "0.graph_conv.nn.0.",
              "grapher.graph_conv.nn.norm.": "0.graph_conv.nn.1.",
              "grapher.fc2.conv.": "0.fc2.0.", "grapher.fc2.norm.": "0.fc2.1.", "ffn.fc1.conv.": "1.fc1.0.",
              "ffn.fc1.norm.": "1.fc1.1.", "ffn.fc2.conv.": "1.fc2.0.", "ffn.fc2.norm.": "1.fc2.1."},
}  # fmt: skip


def _map_keys(state_dict: dict[str, Tensor], prefixes: list[tuple[str, str, str]]) -> dict[str, str]:
    mapping, orphans = {}, []
    for key in state_dict:
        for ours, official, kind in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                sub = next(
                    (s for s in sorted(_RENAMES[kind], key=len, reverse=True) if rest.startswith(s)), None
                )
                if sub is not None:
                    mapping[key] = official + _RENAMES[kind][sub] + rest[len(sub) :]
                    break
        else:
            orphans.append(key)
    if orphans:
        raise ValueError(f"these parameters have no counterpart in the official layout: {orphans[:5]}")
    return mapping


def _mobilevig(**kwargs: Any) -> MobileViG:
    return MobileViG(**kwargs)


@register_model(MobileViG, pretrained="mobilevig_ti")
def mobilevig_ti(**kwargs: Any) -> MobileViG:
    """MobileViG-Ti (5.3 M parameters with the distillation head)."""
    return _mobilevig(**{"local_blocks": (2, 2, 6), "local_channels": (42, 84, 168), "global_blocks": (2,),
                         "global_channels": (256,), "emb_dims": 512, **kwargs})  # fmt: skip


@register_model(MobileViG, pretrained="mobilevig_s")
def mobilevig_s(**kwargs: Any) -> MobileViG:
    """MobileViG-S (7.3 M parameters with the distillation head)."""
    return _mobilevig(**{"local_blocks": (3, 3, 9), "local_channels": (42, 84, 176), "global_blocks": (3,),
                         "global_channels": (256,), "emb_dims": 512, **kwargs})  # fmt: skip


@register_model(MobileViG, pretrained="mobilevig_m")
def mobilevig_m(**kwargs: Any) -> MobileViG:
    """MobileViG-M (14.1 M parameters with the distillation head)."""
    return _mobilevig(**{"local_blocks": (3, 3, 9), "local_channels": (42, 84, 224), "global_blocks": (3,),
                         "global_channels": (400,), "emb_dims": 768, **kwargs})  # fmt: skip


@register_model(MobileViG, pretrained="mobilevig_b")
def mobilevig_b(**kwargs: Any) -> MobileViG:
    """MobileViG-B (26.9 M parameters with the distillation head)."""
    return _mobilevig(**{"local_blocks": (5, 5, 15), "local_channels": (42, 84, 240), "global_blocks": (5,),
                         "global_channels": (464,), "emb_dims": 768, **kwargs})  # fmt: skip


@register_model(MobileViG, test=True)
def mobilevig_test(**kwargs: Any) -> MobileViG:
    """A tiny MobileViG for tests (the shape of the official fixture: widths 16-48, 96x96 input)."""
    return _mobilevig(**{"local_blocks": (1, 1, 2), "local_channels": (16, 24, 32), "global_blocks": (2,),
                         "global_channels": (48,), "emb_dims": 64, "img_size": 96, **kwargs})  # fmt: skip
