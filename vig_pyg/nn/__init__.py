"""Graph convolutions: ViG's four operators as PyG ``MessagePassing`` layers, and the conv registry."""

from vig_pyg.nn.base import ViGConv
from vig_pyg.nn.concat_mr import ConcatMRConv
from vig_pyg.nn.edge import EdgeConv
from vig_pyg.nn.gin import GINConv
from vig_pyg.nn.mlp import GroupedLinear, GroupedMLP
from vig_pyg.nn.mr import MRConv
from vig_pyg.nn.registry import PyGConvAdapter, build_conv, list_convs, register_conv
from vig_pyg.nn.sage import GraphSAGE

__all__ = [
    "ConcatMRConv",
    "EdgeConv",
    "GINConv",
    "GraphSAGE",
    "GroupedLinear",
    "GroupedMLP",
    "MRConv",
    "PyGConvAdapter",
    "ViGConv",
    "build_conv",
    "list_convs",
    "register_conv",
]
