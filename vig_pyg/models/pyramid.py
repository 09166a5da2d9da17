"""Pyramid ViG: four stages at strides 4, 8, 16 and 32.

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
    ViGStage,
    ceil_div,
    check_positive_ints,
    downsample,
    image_size_pair,
    per_block,
    per_block_ints,
)
from vig_pyg.models.registry import register_model
from vig_pyg.tuning import set_gemm

__all__ = ["PyramidViG"]


class PyramidViG(ViGModel):
    """Pyramid ViG-Ti/S/M/B: a 3-conv stem to a 1/4 grid, four stages of Grapher + FFN blocks.

    Every Grapher adds the relative-position term to its kNN distance. The first two stages search their
    neighbours among average-pooled key nodes (reduce ratios 4 and 2), which keeps the kNN cheap at
    3136 and 784 nodes.

    Args:
        channels: width of each of the four stages.
        blocks: blocks in each stage.
        k: neighbours of every Grapher, or a sequence with one ``k`` per Grapher.
        conv: graph convolution (a name or class; see :func:`vig_pyg.nn.build_conv`).
        graph: graph builder of every Grapher (a name or class; see :func:`vig_pyg.graph.build_graph`):
            ``"knn"`` (ViG's dynamic kNN, the default), ``"grid"``, ``"random"``, ``"radius"``, ...
        conv_kwargs: further options of the conv (e.g. ``{"heads": 2, "concat": False}`` for ``"gat"``).
        graph_kwargs: the builder's options, one dict for all Graphers or a sequence of one per Grapher.
        num_classes: classifier outputs (0 for none).
        img_size: the input size the position embedding and dilation schedule are planned for; other
            sizes work too (the embedding is resized, dilation capped by the node count).
        in_chans: image channels.
        act: activation.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        reduce_ratios: average-pool factor of each stage's key nodes.
        stochastic, epsilon: stochastic dilation in training.
        knn_method: kNN back-end, ``"auto"``, ``"dense"`` or ``"torch_cluster"``.
        head_hidden: width of the head's hidden layer (1024 officially).
        gemm: how the fc layers run their GEMMs, ``"linear"`` or ``"conv"`` (same numbers up to float
            rounding), or ``"auto"``: per layer, the one measured faster on this machine
            (:func:`vig_pyg.tuning.set_gemm`; shown in the layers' ``repr``).
    """

    def __init__(
        self,
        channels: Sequence[int] = (48, 96, 240, 384),
        blocks: Sequence[int] = (2, 2, 6, 2),
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
        reduce_ratios: Sequence[int] = (4, 2, 1, 1),
        stochastic: bool = False,
        epsilon: float = 0.2,
        knn_method: KNNMethod = "auto",
        head_hidden: int = 1024,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        # Four stages, each with at least one graph block.
        channels = check_positive_ints("channels", channels, count=4)
        blocks = check_positive_ints("blocks", blocks, count=4)
        reduce_ratios = check_positive_ints("reduce_ratios", reduce_ratios, count=4)
        total = sum(blocks)
        ks = per_block_ints("k", k, total)
        options = per_block("graph_kwargs", graph_kwargs if graph_kwargs is not None else {}, total, dict)
        if any(c % 4 for c in channels):
            raise ValueError(
                f"stage widths must be divisible by 4 (grouped convs, sine-cosine term), got {channels}"
            )
        self.img_size = image_size_pair(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.channels, self.depths, self.reduce_ratios, self.ks = channels, blocks, reduce_ratios, ks
        self.num_features = channels[-1]
        self.head_hidden_size = head_hidden
        grid = (ceil_div(self.img_size[0], 4), ceil_div(self.img_size[1], 4))
        last = (ceil_div(self.img_size[0], 32), ceil_div(self.img_size[1], 32))
        max_dilation = max(1, last[0] * last[1] // max(ks))
        dpr = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()
        # The dilation uses the block index counted across all stages.
        self.dilations = [min(i // 4 + 1, max_dilation) for i in range(total)]

        self.stem = Stem(in_chans, (channels[0] // 2, channels[0], channels[0]), (2, 2, 1), act)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], *grid))
        stages, idx = [], 0
        stage_grid = grid
        for s, (width, depth, r) in enumerate(zip(channels, blocks, reduce_ratios)):
            if s > 0:
                stage_grid = (ceil_div(stage_grid[0], 2), ceil_div(stage_grid[1], 2))
            stage_blocks = [
                ViGBlock(
                    width,
                    k=ks[idx + j],
                    dilation=self.dilations[idx + j],
                    conv=conv,
                    conv_kwargs=conv_kwargs,
                    graph=graph,
                    graph_kwargs=options[idx + j],
                    reduce_ratio=r,
                    relative_pos=True,
                    act=act,
                    drop_path=dpr[idx + j],
                    stochastic=stochastic,
                    epsilon=epsilon,
                    knn_method=knn_method,
                    grid_size=stage_grid,
                )
                for j in range(depth)
            ]
            stages.append(ViGStage(stage_blocks, downsample(channels[s - 1], width) if s > 0 else None))
            idx += depth
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(channels[-1], head_hidden, num_classes, act, drop_rate)
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**s, module=f"stages.{s}") for s, c in enumerate(channels)
        ]
        self.default_out_indices = (0, 1, 2, 3)
        self.min_input_size = self._smallest_square(max(self.img_size) * 4)
        self._init_weights()
        set_gemm(self, gemm)

    def _levels(self) -> list[nn.Module]:
        return list(self.stages)

    def _block_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        h, w = ceil_div(height, 4), ceil_div(width, 4)
        grids = []
        for s, depth in enumerate(self.depths):
            if s > 0:
                h, w = ceil_div(h, 2), ceil_div(w, 2)
            grids += [(h, w)] * depth
        return grids


def _pyramid(**kwargs: Any) -> PyramidViG:
    return PyramidViG(**kwargs)


@register_model(PyramidViG, pretrained="pvig_ti")
def pvig_ti_224_gelu(**kwargs: Any) -> PyramidViG:
    """Pyramid ViG-Ti (10.7 M parameters)."""
    return _pyramid(**{"channels": (48, 96, 240, 384), "blocks": (2, 2, 6, 2), **kwargs})


@register_model(PyramidViG, pretrained="pvig_s")
def pvig_s_224_gelu(**kwargs: Any) -> PyramidViG:
    """Pyramid ViG-S (27.3 M parameters)."""
    return _pyramid(**{"channels": (80, 160, 400, 640), "blocks": (2, 2, 6, 2), **kwargs})


@register_model(PyramidViG, pretrained="pvig_m")
def pvig_m_224_gelu(**kwargs: Any) -> PyramidViG:
    """Pyramid ViG-M (49.5 M trainable parameters)."""
    return _pyramid(**{"channels": (96, 192, 384, 768), "blocks": (2, 2, 16, 2), **kwargs})


@register_model(PyramidViG, pretrained="pvig_b")
def pvig_b_224_gelu(**kwargs: Any) -> PyramidViG:
    """Pyramid ViG-B (93.0 M trainable parameters)."""
    return _pyramid(**{"channels": (128, 256, 512, 1024), "blocks": (2, 2, 18, 2), **kwargs})


@register_model(PyramidViG, test=True)
def pvig_test(**kwargs: Any) -> PyramidViG:
    """A tiny Pyramid ViG for tests and quick experiments (widths 12-48, 96x96 input)."""
    return _pyramid(
        **{"channels": (12, 24, 36, 48), "blocks": (1, 1, 2, 1), "img_size": 96, "head_hidden": 64, **kwargs}
    )
