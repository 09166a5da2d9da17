"""What a graph builder is: a module from a block's node features and their grid to a :class:`Graph`.

A Grapher asks its builder for the graph of every forward pass and hands that graph to its conv. The
builder decides the edges and the source nodes (Pyramid ViG's average-pooled keys, or the nodes
themselves); the :class:`Graph` says how the edges are laid out, so that a conv can take a fast path
for ``k``-regular graphs and PyG's general aggregation for any other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.graph.bridge import grid_positions, image_to_nodes, nodes_to_image
from vig_pyg.graph.knn import neighbors_to_edge_index

__all__ = ["Graph", "GraphBuilder", "PatchGrid", "per_image"]


class PatchGrid(NamedTuple):
    """The layout of a block's nodes: ``batch_size`` images of ``height x width`` patches, raster order."""

    batch_size: int
    height: int
    width: int

    @property
    def num_nodes(self) -> int:
        """Nodes per image."""
        return self.height * self.width

    def positions(self, device: torch.device | None = None) -> Tensor:
        """``(H * W, 2)`` integer ``(row, col)`` of one image's nodes."""
        return grid_positions(self.height, self.width, device)


class Graph:
    """The edges a builder gives a conv, and how they are laid out.

    Args:
        edge_index: ``(2, E)`` integer tensor, row 0 the source, row 1 the target of every edge (PyG's
            ``source_to_target`` flow). Node indices run over the whole batch.
        sources: the source nodes' features when they are other nodes than the targets (a bipartite
            graph, e.g. Pyramid ViG's pooled keys), else ``None`` (sources and targets are the same nodes).
        edge_attr: ``(E, D)`` edge features for convs that take them (PyG's ``edge_attr``), or ``None``.

    A graph made this way is *ragged*: any number of edges per target, in any order, and convs aggregate
    it with PyG's scatter. :meth:`k_regular` makes one that promises exactly ``k`` edges per target,
    grouped by target in order (target 0's ``k`` edges, then target 1's, ...), which convs aggregate as
    an ``(N, k, C)`` view; the promise is checked there, so a shuffled ``edge_index`` cannot give a
    silently wrong result.
    """

    def __init__(
        self, edge_index: Tensor, sources: Tensor | None = None, edge_attr: Tensor | None = None
    ) -> None:
        if not isinstance(edge_index, Tensor) or edge_index.is_floating_point() or edge_index.dim() != 2:
            raise TypeError("edge_index must be an integer tensor of shape (2, num_edges)")
        if edge_index.size(0) != 2:
            raise ValueError(f"edge_index must be (2, num_edges), got {tuple(edge_index.shape)}")
        if sources is not None and (not isinstance(sources, Tensor) or sources.dim() != 2):
            raise TypeError("sources must be a (num_sources, C) tensor of the source nodes' features or None")
        self.edge_index = edge_index
        self.sources = sources
        self.edge_attr = edge_attr
        self.k: int | None = None

    @classmethod
    def k_regular(
        cls, edge_index: Tensor, k: int, sources: Tensor | None = None, edge_attr: Tensor | None = None
    ) -> Graph:
        """A graph whose targets ``0 .. E/k - 1`` have ``k`` edges each, grouped by target in order.

        The layout is checked (one comparison over the edges): a ``ValueError`` says what is wrong and how
        to fix it. Call it outside compiled code (the check reads tensor values).
        """
        graph = cls._k_regular_unchecked(edge_index, k, sources, edge_attr)
        num_targets = edge_index.size(1) // k
        if edge_index.size(1) != num_targets * k:
            raise ValueError(
                f"a k-regular graph with k={k} has a multiple of {k} edges, got {edge_index.size(1)}"
            )
        expected = torch.arange(num_targets, device=edge_index.device, dtype=edge_index.dtype)
        if not bool((edge_index[1].view(num_targets, k) == expected.unsqueeze(1)).all()):
            raise ValueError(
                f"k={k} promises edges grouped by target (target 0's {k} edges first, then target 1's, ...), "
                "but edge_index is ordered otherwise; sort it by target (e.g. torch_geometric.utils."
                "sort_edge_index(edge_index, sort_by_row=False)) or make a ragged Graph(edge_index)"
            )
        return graph

    @classmethod
    def from_neighbors(
        cls, neighbors: Tensor, sources: Tensor | None = None, edge_attr: Tensor | None = None
    ) -> Graph:
        """The k-regular graph of an ``(N, k)`` table: ``neighbors[i]`` are the sources of target ``i``.

        The layout follows from the table, so nothing is checked on values: the way for builders to
        make k-regular graphs inside compiled and exported models.
        """
        if not isinstance(neighbors, Tensor) or neighbors.dim() != 2 or neighbors.is_floating_point():
            raise TypeError("neighbors must be an (N, k) integer tensor of source indices per target")
        edge_index = neighbors_to_edge_index(neighbors)
        return cls._k_regular_unchecked(edge_index, neighbors.size(1), sources, edge_attr)

    @classmethod
    def _k_regular_unchecked(
        cls, edge_index: Tensor, k: int, sources: Tensor | None = None, edge_attr: Tensor | None = None
    ) -> Graph:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int (the in-degree of every target), got {k!r}")
        graph = cls(edge_index, sources, edge_attr)
        graph.k = k
        return graph

    @property
    def num_edges(self) -> int:
        return self.edge_index.size(1)

    def __repr__(self) -> str:
        layout = f"k={self.k}" if self.k is not None else "ragged"
        keys = f", sources={tuple(self.sources.shape)}" if self.sources is not None else ""
        return f"Graph(edges={self.num_edges}, {layout}{keys})"


def per_image(table: Tensor, batch_size: int, num_keys: int) -> Tensor:
    """``(B * N, k)`` global source indices from one image's ``(N, k)`` table of key indices: the same
    neighbours in every image of the batch, offset by ``num_keys`` per image."""
    offsets = torch.arange(batch_size, device=table.device, dtype=table.dtype) * num_keys
    return (table.unsqueeze(0) + offsets.view(-1, 1, 1)).reshape(-1, table.size(1))


class GraphBuilder(nn.Module):
    """Base of the graph builders: ``forward(nodes, grid) -> Graph``.

    ``nodes`` are a block's ``(B * H * W, C)`` node features in raster order per image, ``grid`` their
    :class:`PatchGrid`. With ``reduce_ratio > 1`` the sources are the nodes of the ``reduce_ratio``
    average-pooled map (:meth:`key_nodes`; Pyramid ViG's cheap early stages), a bipartite graph.

    Subclasses set ``k`` (neighbours per target, or ``None`` when the degree varies) and ``regular``
    (whether every graph they build is :meth:`Graph.k_regular`), and implement :meth:`forward`.
    """

    k: int | None = None
    regular: bool = False

    def __init__(self, reduce_ratio: int = 1) -> None:
        super().__init__()
        if isinstance(reduce_ratio, bool) or not isinstance(reduce_ratio, int) or reduce_ratio < 1:
            raise ValueError(f"reduce_ratio must be a positive int, got {reduce_ratio!r}")
        self.reduce_ratio = reduce_ratio

    def key_nodes(self, nodes: Tensor, grid: PatchGrid) -> Tensor:
        """The source nodes: ``nodes`` themselves, or those of the average-pooled map ``(B * M, C)``."""
        r = self.reduce_ratio
        if r == 1:
            return nodes
        return image_to_nodes(F.avg_pool2d(nodes_to_image(nodes, *grid), r, r))

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` of the source nodes' grid for a grid of ``height x width`` targets."""
        r = self.reduce_ratio
        return (height // r, width // r) if r > 1 else (height, width)

    @property
    def min_keys(self) -> int:
        """The fewest source nodes per image this builder can work with."""
        return self.k if self.k is not None else 1

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        raise NotImplementedError

    def describe(self, grid: PatchGrid) -> str:
        """A short text of this builder's settings at ``grid`` (``vig-pyg info``'s graph column)."""
        return self.extra_repr()
