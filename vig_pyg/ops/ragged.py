"""``vig_pyg::masked_edges``: the ragged edge list of a neighbour table and a keep mask.

Graphs whose degree depends on the features (a radius graph) have a data-dependent edge count. As an
operator with a fake kernel that declares that count a new symbolic size, ``torch.compile`` and
``torch.export`` capture such a graph in one piece instead of breaking at ``nonzero``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_edges", "masked_edges_reference"]


def masked_edges_reference(neighbors: Tensor, keep: Tensor) -> Tensor:
    target, slot = keep.nonzero(as_tuple=True)
    return torch.stack([neighbors[target, slot], target])


@torch.library.custom_op("vig_pyg::masked_edges", mutates_args=())
def masked_edges(neighbors: Tensor, keep: Tensor) -> Tensor:
    """``(2, E)`` edges ``(neighbors[i, j], i)`` for every ``keep[i, j]``: sorted by target ``i``, and
    within a target in the table's order."""
    return masked_edges_reference(neighbors, keep)


@masked_edges.register_fake
def _(neighbors: Tensor, keep: Tensor) -> Tensor:
    bound = neighbors.numel()  # an upper bound, where it is a number (a dynamic batch makes it symbolic)
    ctx = torch.library.get_ctx()
    num_edges = ctx.new_dynamic_size(max=bound) if isinstance(bound, int) else ctx.new_dynamic_size()
    return neighbors.new_empty((2, num_edges))
