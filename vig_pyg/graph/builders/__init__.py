"""Graph builders by name, the way convolutions are chosen: ``create_model(..., graph="grid")``.

A builder is a :class:`GraphBuilder` (one file each): ``forward(nodes, grid) -> Graph``. A model builds one
per Grapher with :func:`build_graph`, which gives the builder the block's settings it takes (``k``,
``dilation``, ``reduce_ratio``, ``channels``, ``relative_pos``, ``grid_size``, ... : whichever its
``__init__`` names) and then the user's options, which must all be accepted.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid, per_image
from vig_pyg.graph.builders.dagc import DAGCGraph
from vig_pyg.graph.builders.grid import GridGraph
from vig_pyg.graph.builders.knn import GridKNNGraph
from vig_pyg.graph.builders.radius import RadiusGraph
from vig_pyg.graph.builders.random import RandomGraph
from vig_pyg.graph.builders.svga import SVGAGraph

__all__ = [
    "DAGCGraph",
    "Graph",
    "GraphBuilder",
    "GridGraph",
    "GridKNNGraph",
    "PatchGrid",
    "RadiusGraph",
    "RandomGraph",
    "SVGAGraph",
    "build_graph",
    "graph_name",
    "list_graphs",
    "per_image",
    "register_graph",
]

_REGISTRY: dict[str, Callable[..., GraphBuilder]] = {
    "knn": GridKNNGraph,
    "grid": GridGraph,
    "random": RandomGraph,
    "radius": RadiusGraph,
    "svga": SVGAGraph,
    "dagc": DAGCGraph,
}


def list_graphs() -> list[str]:
    """Names accepted by :func:`build_graph`."""
    return sorted(_REGISTRY)


def register_graph(name: str, factory: Callable[..., GraphBuilder], *, overwrite: bool = False) -> None:
    """Make ``factory`` (a :class:`GraphBuilder` subclass, or a function returning one) available as
    ``graph=name``; a model built with a registered name saves that name, so its checkpoints reload."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a graph builder's name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a graph builder named {name!r} is already registered; pass overwrite=True")
    if not callable(factory):
        raise TypeError(f"factory must be a GraphBuilder class or a function returning one, got {factory!r}")
    _REGISTRY[name] = factory


def graph_name(graph: str | Callable[..., GraphBuilder]) -> str:
    """The registered name of ``graph`` (a name, or a registered class or function), else its ``__name__``."""
    if isinstance(graph, str):
        return graph
    for name, factory in _REGISTRY.items():
        if factory is graph:
            return name
    return getattr(graph, "__name__", type(graph).__name__)


def _factory(graph: str | Callable[..., GraphBuilder]) -> Callable[..., GraphBuilder]:
    if isinstance(graph, str):
        if graph not in _REGISTRY:
            close = difflib.get_close_matches(graph, list(_REGISTRY), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown graph builder {graph!r}; known: {', '.join(list_graphs())}.{hint}")
        return _REGISTRY[graph]
    if callable(graph):
        return graph
    raise TypeError(f"graph must be a name, a GraphBuilder class or a factory, got {type(graph).__name__}")


def _parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    names = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_graph(
    graph: str | Callable[..., GraphBuilder],
    options: Mapping[str, Any] | None = None,
    **block: Any,
) -> GraphBuilder:
    """A graph builder for one block.

    Args:
        graph: a registered name (:func:`list_graphs`), a :class:`GraphBuilder` subclass or a function
            returning a builder.
        options: the user's options for it (e.g. ``{"r": 0.8}``); each must be a parameter of the builder.
        **block: the block's settings (``k``, ``dilation``, ``reduce_ratio``, ``channels``, ``grid_size``,
            ...); those the builder takes are passed, the others left out. ``options`` win over them.
    """
    factory = _factory(graph)
    names, any_keyword = _parameters(factory)
    options = dict(options or {})
    unknown = sorted(set(options) - names) if not any_keyword else []
    if unknown:
        raise ValueError(
            f"graph builder {graph_name(graph)!r} takes no option(s) {unknown}; it takes: "
            f"{', '.join(sorted(names)) or 'none'}"
        )
    kwargs = {n: v for n, v in block.items() if n in names}
    builder = factory(**{**kwargs, **options})
    if not isinstance(builder, GraphBuilder):
        raise TypeError(
            f"graph builder {graph_name(graph)!r} returned {type(builder).__name__}, not a GraphBuilder "
            "(subclass vig_pyg.graph.GraphBuilder: forward(nodes, grid) -> Graph)"
        )
    return builder
