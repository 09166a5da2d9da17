"""``knn``: ViG's dynamic graph, rebuilt from the node features on every forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vig_pyg.graph.builders.base import Graph, GraphBuilder, PatchGrid
from vig_pyg.graph.knn import (
    KNNMethod,
    LowRankBias,
    _cluster_candidates,
    choose_method,
    dilate,
    equal_size_candidates,
)
from vig_pyg.graph.relative_pos import relative_position_bias, relative_position_factors

__all__ = ["GridKNNGraph"]


class GridKNNGraph(GraphBuilder):
    """ViG's dynamic graph over the ``H x W`` patch grid of each image in a batch.

    Every forward pass joins each query node to ``k`` of its ``k * dilation`` nearest key nodes (by
    L2-normalised features), within its own image: every ``dilation``-th of them, or (stochastic
    dilation, in training) a random ``k`` of them with probability ``epsilon``. With ``relative_pos``,
    Pyramid ViG's relative-position term for a grid of ``channels`` channels is added to the distance;
    for the planned ``grid_size`` it is precomputed (a non-persistent buffer), for other grids computed
    on first use.

    When an input is smaller than the one the dilation was planned for, the dilation is lowered to what
    the key nodes allow (``keys // k``), as the official models derive their largest dilation from the
    node count; at the planned size nothing changes.

    The forward pass has no Python branch on tensor values: ``torch.compile`` runs it without graph breaks
    and ``torch.export`` captures it (the torch_cluster back-end as a custom op).

    Args:
        k: neighbours per node.
        dilation: dilation ``d``.
        reduce_ratio: the key nodes are the grid average-pooled by this factor (Pyramid ViG's ``r``).
        channels: the node feature width (needed for ``relative_pos``).
        relative_pos: add Pyramid ViG's relative-position term to the distance.
        stochastic: stochastic dilation in training.
        epsilon: its probability.
        method: kNN back-end (``"auto"``, ``"dense"`` or ``"torch_cluster"``).
        grid_size: the ``(H, W)`` the model is planned for (precomputes the relative-position term).
    """

    regular = True

    def __init__(
        self,
        k: int = 9,
        dilation: int = 1,
        reduce_ratio: int = 1,
        channels: int | None = None,
        relative_pos: bool = False,
        stochastic: bool = False,
        epsilon: float = 0.2,
        method: KNNMethod = "auto",
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(reduce_ratio)
        if method not in ("auto", "dense", "torch_cluster"):
            raise ValueError(f"unknown kNN method {method!r}; choose 'auto', 'dense' or 'torch_cluster'")
        for name, value in (("k", k), ("dilation", dilation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if relative_pos and channels is None:
            raise ValueError("relative_pos=True needs channels (the width of the position term)")
        self.k, self.dilation = k, dilation
        relative_pos_dim = channels if relative_pos else None
        self.relative_pos_dim = relative_pos_dim
        self.stochastic, self.epsilon, self.method = stochastic, epsilon, method
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        bias = query = key = None
        if relative_pos_dim is not None and self.grid_size is not None:
            h, w = self.grid_size
            bias = relative_position_bias(relative_pos_dim, h, w, reduce_ratio)
            query, key = relative_position_factors(relative_pos_dim, h, w, reduce_ratio)
        # Derived from the configuration, so not saved: checkpoints stay weights only.
        self.register_buffer("rel_bias", bias, persistent=False)
        self.register_buffer("rel_query", query, persistent=False)
        self.register_buffer("rel_key", key, persistent=False)

    def effective_dilation(self, num_keys: int) -> int:
        if num_keys < self.k:
            raise ValueError(
                f"the input is too small for this model: a graph block has {num_keys} key nodes but needs "
                f"k={self.k}; use a larger image (see the model's min_input_size)"
            )
        return max(1, min(self.dilation, num_keys // self.k))

    def _bias(
        self, dense: bool, height: int, width: int, device: torch.device
    ) -> Tensor | LowRankBias | None:
        if self.relative_pos_dim is None:
            return None
        if (height, width) == self.grid_size:
            return self.rel_bias if dense else LowRankBias(self.rel_query, self.rel_key)
        if dense:
            return relative_position_bias(self.relative_pos_dim, height, width, self.reduce_ratio, device)
        return relative_position_factors(self.relative_pos_dim, height, width, self.reduce_ratio, device)

    def forward(self, nodes: Tensor, grid: PatchGrid) -> Graph:
        """Each of the ``B * H * W`` nodes joined to ``k`` key nodes of its image: a k-regular graph.

        Args:
            nodes: ``(B * H * W, C)`` node features (raster order per image).
            grid: their layout.
        """
        batch_size, height, width = grid
        keys = self.key_nodes(nodes, grid)
        n = height * width
        m = keys.size(0) // batch_size
        d = self.effective_dilation(m)
        kd = self.k * d
        stochastic = self.stochastic and self.training
        method = self.method
        if method == "auto":
            method = choose_method(nodes.size(1), n, m)
        bipartite = keys is not nodes
        with torch.no_grad():
            x = F.normalize(nodes, dim=-1)
            y = F.normalize(keys, dim=-1) if bipartite else x
            bias = self._bias(method == "dense", height, width, nodes.device)
            if method == "dense":
                nbr = equal_size_candidates(x, y if bipartite else None, kd, batch_size, bias)
            else:
                batch = torch.arange(batch_size, device=nodes.device).repeat_interleave(n)
                batch_y = (
                    torch.arange(batch_size, device=nodes.device).repeat_interleave(m) if bipartite else batch
                )
                nbr = _cluster_candidates(x, y if bipartite else None, kd, batch, batch_y, bias)
            nbr = dilate(nbr, self.k, d, stochastic=stochastic, epsilon=self.epsilon)
        return Graph.from_neighbors(nbr, keys if bipartite else None)

    def describe(self, grid: PatchGrid) -> str:
        m = self.key_grid(grid.height, grid.width)
        parts = [f"knn k={self.k}", f"dilation={self.effective_dilation(m[0] * m[1])}"]
        if self.relative_pos_dim is not None:
            parts.append("relative_pos")
        return " ".join(parts)

    def extra_repr(self) -> str:
        parts = [f"k={self.k}", f"dilation={self.dilation}"]
        if self.reduce_ratio > 1:
            parts.append(f"reduce_ratio={self.reduce_ratio}")
        if self.relative_pos_dim is not None:
            parts.append("relative_pos=True")
        if self.stochastic:
            parts.append(f"stochastic=True, epsilon={self.epsilon}")
        parts.append(f"method={self.method!r}")
        return ", ".join(parts)
