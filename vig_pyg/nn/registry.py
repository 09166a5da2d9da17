"""Graph convolutions by name: the four ViG convolutions and stock PyTorch Geometric ones.

A Grapher asks :func:`build_conv` for a convolution from ``in_channels`` to ``out_channels`` node
features and calls it as ``conv(nodes, graph)`` with the :class:`vig_pyg.graph.Graph` its builder made.
ViG's own convolutions take that call directly; any other class is wrapped in :class:`PyGConvAdapter`,
which passes the graph's ``edge_index`` (and its source nodes, as a pair) and gives bipartite input to
convolutions that only accept one node set.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor, nn

from vig_pyg.graph.builders.base import Graph
from vig_pyg.nn.base import PairTensor, ViGConv
from vig_pyg.nn.concat_mr import ConcatMRConv
from vig_pyg.nn.edge import EdgeConv
from vig_pyg.nn.gin import GINConv
from vig_pyg.nn.mr import MRConv
from vig_pyg.nn.sage import GraphSAGE

__all__ = [
    "PyGConvAdapter",
    "build_conv",
    "list_convs",
    "register_conv",
    "resolve_conv_name",
    "takes_vig_options",
]


@dataclass(frozen=True)
class _ConvEntry:
    factory: Callable[..., nn.Module]
    # Whether the convolution accepts a pair (x_src, x_dst); if not, bipartite graphs are run as the
    # union of both node sets.
    bipartite: bool = True
    defaults: dict[str, Any] = field(default_factory=dict)


def _mlp(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_channels, out_channels), nn.GELU(), nn.Linear(out_channels, out_channels)
    )


def _pyg_gin(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    return pyg_nn.GINConv(_mlp(in_channels, out_channels), **kwargs)


def _pyg_edge(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    return pyg_nn.EdgeConv(_mlp(2 * in_channels, out_channels), **kwargs)


_VIG_CONVS: dict[str, type[ViGConv]] = {
    "mr": MRConv,
    "edge": EdgeConv,
    "gin": GINConv,
    "sage": GraphSAGE,
    "mr_concat": ConcatMRConv,
}

_REGISTRY: dict[str, _ConvEntry] = {name: _ConvEntry(cls) for name, cls in _VIG_CONVS.items()}
_REGISTRY.update(
    {
        # A kNN graph already holds self-loops (r = 1) and pooled keys are not the centre nodes (r > 1),
        # so attention layers add none of their own.
        "gat": _ConvEntry(pyg_nn.GATConv, defaults={"add_self_loops": False}),
        "gatv2": _ConvEntry(pyg_nn.GATv2Conv, defaults={"add_self_loops": False}),
        "gcn": _ConvEntry(pyg_nn.GCNConv, bipartite=False),
        "sage_pyg": _ConvEntry(pyg_nn.SAGEConv),
        "transformer": _ConvEntry(pyg_nn.TransformerConv),
        "graphconv": _ConvEntry(pyg_nn.GraphConv),
        "gin_pyg": _ConvEntry(_pyg_gin),
        "edge_pyg": _ConvEntry(_pyg_edge),
    }
)


def takes_vig_options(conv: str | type | Callable[..., nn.Module]) -> bool:
    """Whether ``conv`` is one of ViG's own convolutions (taking ``groups``, ``act``, ``norm``, ``bias``)."""
    if isinstance(conv, str):
        return conv in _VIG_CONVS
    return inspect.isclass(conv) and issubclass(conv, ViGConv)


def list_convs() -> list[str]:
    """Names accepted by :func:`build_conv`."""
    return sorted(_REGISTRY)


def register_conv(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    bipartite: bool = True,
    overwrite: bool = False,
    **defaults: Any,
) -> None:
    """Make ``factory(in_channels, out_channels, **kwargs)`` available under ``name``.

    Set ``bipartite=False`` when the module cannot take a pair ``(x_src, x_dst)``.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"a convolution named {name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[name] = _ConvEntry(factory, bipartite, dict(defaults))


def resolve_conv_name(conv: str | type) -> str:
    """A printable name for ``conv`` (a registered name or a class)."""
    if isinstance(conv, str):
        return conv
    for name, entry in _REGISTRY.items():
        if entry.factory is conv:
            return name
    return getattr(conv, "__name__", repr(conv))


class PyGConvAdapter(nn.Module):
    """Gives any PyG-style convolution the Grapher's call ``conv(x, graph)``.

    A :class:`vig_pyg.graph.Graph` becomes its ``edge_index`` (the k-regular layout is a hint for ViG's
    own convolutions and is not needed here) and, for a bipartite graph, the pair ``(sources, x)``. A
    convolution that cannot take a pair ``(x_src, x_dst)`` (``bipartite=False``) is run on the union of
    both node sets, targets first, and the targets' rows are returned: messages still only flow along the
    given edges.
    """

    def __init__(self, conv: nn.Module, bipartite: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.bipartite = bipartite
        # Whether the conv takes edge features (PyG's edge_attr), which a Graph may carry.
        self.takes_edge_attr = "edge_attr" in inspect.signature(conv.forward).parameters

    def forward(self, x: Tensor | PairTensor, edge_index: Tensor | Graph) -> Tensor:
        extra: dict[str, Tensor] = {}
        if isinstance(edge_index, Graph):
            if isinstance(x, Tensor) and edge_index.sources is not None:
                x = (edge_index.sources, x)
            if edge_index.edge_attr is not None and self.takes_edge_attr:
                extra["edge_attr"] = edge_index.edge_attr
            edge_index = edge_index.edge_index
        if isinstance(x, Tensor):
            return self.conv(x, edge_index, **extra)
        x_src, x_dst = x
        if x_src is x_dst:
            return self.conv(x_dst, edge_index, **extra)
        if self.bipartite:
            return self.conv((x_src, x_dst), edge_index, **extra)
        num_dst = x_dst.size(0)
        shifted = torch.stack([edge_index[0] + num_dst, edge_index[1]])
        return self.conv(torch.cat([x_dst, x_src], dim=0), shifted, **extra)[:num_dst]

    def reset_parameters(self) -> None:
        if hasattr(self.conv, "reset_parameters"):
            self.conv.reset_parameters()


def build_conv(
    conv: str | type | Callable[..., nn.Module], in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """Build a graph convolution from ``in_channels`` to ``out_channels`` node features.

    Args:
        conv: a registered name (:func:`list_convs`: ``"mr"``, ``"edge"``, ``"gin"``, ``"sage"`` are ViG's
            own; ``"gat"``, ``"gcn"``, ``"sage_pyg"``, ``"transformer"``, ... are PyG's), a ViG conv class,
            or any class/callable ``f(in_channels, out_channels, **kwargs)`` returning a PyG-style
            convolution (wrapped as if it could not take bipartite input).
        in_channels: input node feature width.
        out_channels: output node feature width.
        **kwargs: passed to the convolution (ViG convs take ``groups``, ``act``, ``norm``, ``bias``).
    """
    if isinstance(conv, str):
        if conv not in _REGISTRY:
            close = difflib.get_close_matches(conv, list(_REGISTRY), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown graph convolution {conv!r}; known: {', '.join(list_convs())}.{hint}")
        entry = _REGISTRY[conv]
    elif inspect.isclass(conv) and issubclass(conv, ViGConv):
        entry = _ConvEntry(conv)
    elif callable(conv):
        known = next((e for e in _REGISTRY.values() if e.factory is conv), None)
        entry = known or _ConvEntry(_with_mlp(conv) or conv, bipartite=False)
    else:
        raise TypeError(f"conv must be a name, a class or a callable, got {type(conv).__name__}")

    module = entry.factory(in_channels, out_channels, **{**entry.defaults, **kwargs})
    if isinstance(module, ViGConv):
        return module
    adapter = PyGConvAdapter(module, bipartite=entry.bipartite)
    _check_width(adapter, resolve_conv_name(conv), in_channels, out_channels)
    return adapter


def _with_mlp(cls: Any) -> Callable[..., nn.Module] | None:
    """A factory for PyG convs whose first argument is the MLP they apply (``GINConv(nn)``,
    ``EdgeConv(nn)``): built with vig_pyg's two-layer MLP, ``2 * in_channels`` wide for EdgeConv's
    ``[x_i, x_j - x_i]``."""
    if not inspect.isclass(cls):
        return None
    params = list(inspect.signature(cls.__init__).parameters)[1:2]
    if params != ["nn"]:
        return None
    width = 2 if issubclass(cls, (pyg_nn.EdgeConv, pyg_nn.DynamicEdgeConv)) else 1

    def factory(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        return cls(_mlp(width * in_channels, out_channels), **kwargs)

    factory.__name__ = cls.__name__
    return factory


def _check_width(conv: nn.Module, name: str, in_channels: int, out_channels: int) -> None:
    # A conv whose output is not out_channels wide (e.g. GATConv with heads=4 concatenated) would fail
    # deep inside the next layer; one probe on a two-node graph says so where the model is built.
    training = conv.training
    conv.eval()
    try:
        with torch.no_grad():
            probe = conv(torch.zeros(2, in_channels), torch.tensor([[0, 1], [1, 0]]))
    finally:
        conv.train(training)
    if probe.dim() != 2 or probe.size(-1) != out_channels:
        raise ValueError(
            f"graph convolution {name!r} maps {in_channels} to {tuple(probe.shape[1:])} channels, but the "
            f"Grapher needs {out_channels}; set its output width (e.g. heads=1 or concat=False for "
            "attention convs, or out_channels divided by heads)"
        )
