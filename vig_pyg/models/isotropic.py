"""Isotropic ViG: one resolution (stride 16) throughout.

Paper: "Vision GNN: An Image is Worth Graph of Nodes", Han et al., NeurIPS 2022
(https://arxiv.org/abs/2206.00272). Original code and weights: https://github.com/huawei-noah/Efficient-AI-Backbones
(``vig_pytorch``), weights released under that repository's licence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vig_pyg.graph.knn import KNNMethod
from vig_pyg.layers.blocks import ViGBlock
from vig_pyg.layers.common import ClassifierHead, Stem
from vig_pyg.models.base import (
    ViGModel,
    ceil_div,
    check_positive_ints,
    image_size_pair,
    per_block,
    per_block_ints,
)
from vig_pyg.models.registry import register_model
from vig_pyg.tuning import set_gemm

__all__ = ["IsotropicViG"]


class IsotropicViG(ViGModel):
    """ViG-Ti/S/B: a 5-conv stem to a 1/16 grid, then ``blocks`` x (Grapher + FFN) at one width.

    Args:
        channels: width of every block.
        blocks: number of Grapher + FFN blocks.
        k: neighbours of the first block; like the official models, it grows linearly to ``2k`` over depth.
            Or a sequence with one ``k`` per block.
        conv: graph convolution (a name or class; see :func:`vig_pyg.nn.build_conv`).
        graph: graph builder of every block (a name or class; see :func:`vig_pyg.graph.build_graph`):
            ``"knn"`` (ViG's dynamic kNN, the default), ``"grid"``, ``"random"``, ``"radius"``, ...
        conv_kwargs: further options of the conv (e.g. ``{"heads": 2, "concat": False}`` for ``"gat"``).
        graph_kwargs: the builder's options, one dict for all blocks or a sequence of one per block.
        num_classes: classifier outputs (0 for none).
        img_size: the input size the position embedding and dilation schedule are planned for; other
            sizes work too (the embedding is resized, dilation capped by the node count).
        in_chans: image channels.
        act: activation.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        use_dilation: dilation ``min(i // 4 + 1, nodes // max k)`` for block ``i``, else 1.
        stochastic, epsilon: stochastic dilation in training.
        knn_method: kNN back-end, ``"auto"``, ``"dense"`` or ``"torch_cluster"``.
        head_hidden: width of the head's hidden layer (1024 officially).
        gemm: how the fc layers run their GEMMs, ``"linear"`` or ``"conv"`` (same numbers up to float
            rounding), or ``"auto"``: per layer, the one measured faster on this machine
            (:func:`vig_pyg.tuning.set_gemm`; shown in the layers' ``repr``).
    """

    def __init__(
        self,
        channels: int = 192,
        blocks: int = 12,
        k: int | Sequence[int] = 9,
        conv: Any = "mr",
        graph: Any = "knn",
        graph_kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        conv_kwargs: dict[str, Any] | None = None,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        act: str = "gelu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_dilation: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.2,
        knn_method: KNNMethod = "auto",
        head_hidden: int = 1024,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        (channels,), (blocks,) = (
            check_positive_ints(n, v) for n, v in (("channels", channels), ("blocks", blocks))
        )
        if channels % 8:
            raise ValueError(
                f"channels must be divisible by 8 (the stem halves it three times), got {channels}"
            )
        self.img_size = image_size_pair(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = channels
        self.head_hidden_size = head_hidden
        grid = (ceil_div(self.img_size[0], 16), ceil_div(self.img_size[1], 16))
        if isinstance(k, int) and not isinstance(k, bool):
            (k,) = check_positive_ints("k", k)
            # k grows from k to 2k; float32 linspace then truncation, as the official schedule is computed.
            self.ks = [int(v) for v in torch.linspace(k, 2 * k, blocks, device="cpu").tolist()]
        else:
            self.ks = per_block_ints("k", k, blocks)
        options = per_block("graph_kwargs", graph_kwargs if graph_kwargs is not None else {}, blocks, dict)
        max_dilation = max(1, grid[0] * grid[1] // max(self.ks))
        self.dilations = [min(i // 4 + 1, max_dilation) if use_dilation else 1 for i in range(blocks)]
        dpr = torch.linspace(0, drop_path_rate, blocks, device="cpu").tolist()

        self.stem = Stem(
            in_chans, (channels // 8, channels // 4, channels // 2, channels, channels), (2, 2, 2, 2, 1), act
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, *grid))
        self.blocks = nn.Sequential(
            *(
                ViGBlock(
                    channels,
                    k=self.ks[i],
                    dilation=self.dilations[i],
                    conv=conv,
                    conv_kwargs=conv_kwargs,
                    graph=graph,
                    graph_kwargs=options[i],
                    act=act,
                    drop_path=dpr[i],
                    stochastic=stochastic,
                    epsilon=epsilon,
                    knn_method=knn_method,
                )
                for i in range(blocks)
            )
        )
        self.head = ClassifierHead(channels, head_hidden, num_classes, act, drop_rate)
        self.feature_info = [
            dict(num_chs=channels, reduction=16, module=f"blocks.{i}") for i in range(blocks)
        ]
        self.default_out_indices = tuple(range(max(0, blocks - 3), blocks))
        self.min_input_size = self._smallest_square(max(self.img_size) * 4)
        self._init_weights()
        set_gemm(self, gemm)

    def _levels(self) -> list[nn.Module]:
        return list(self.blocks)

    def _block_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(ceil_div(height, 16), ceil_div(width, 16))] * len(self.ks)


def _isotropic(**kwargs: Any) -> IsotropicViG:
    return IsotropicViG(**kwargs)


@register_model(IsotropicViG, pretrained="vig_ti")
def vig_ti_224_gelu(**kwargs: Any) -> IsotropicViG:
    """ViG-Ti: 192 channels, 12 blocks (7.2 M parameters)."""
    return _isotropic(**{"channels": 192, "blocks": 12, **kwargs})


@register_model(IsotropicViG, pretrained="vig_s")
def vig_s_224_gelu(**kwargs: Any) -> IsotropicViG:
    """ViG-S: 320 channels, 16 blocks (22.7 M parameters)."""
    return _isotropic(**{"channels": 320, "blocks": 16, **kwargs})


@register_model(IsotropicViG, pretrained="vig_b")
def vig_b_224_gelu(**kwargs: Any) -> IsotropicViG:
    """ViG-B: 640 channels, 16 blocks (86.8 M parameters)."""
    return _isotropic(**{"channels": 640, "blocks": 16, **kwargs})


@register_model(IsotropicViG, test=True)
def vig_test(**kwargs: Any) -> IsotropicViG:
    """A tiny isotropic ViG for tests and quick experiments (48 channels, 4 blocks, 96x96 input)."""
    return _isotropic(**{"channels": 48, "blocks": 4, "img_size": 96, "head_hidden": 64, **kwargs})
