"""Blocks shared by the ViG model families."""

from vig_pyg.layers.blocks import FFN, Grapher, ViGBlock
from vig_pyg.layers.common import ClassifierHead, ConvNorm, DropPath, Stem

__all__ = ["FFN", "ClassifierHead", "ConvNorm", "DropPath", "Grapher", "Stem", "ViGBlock"]
