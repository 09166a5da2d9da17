"""The kNN graph a ViG block rebuilds on every forward pass over its patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vig_pyg.graph.knn import (
    KNNMethod,
    LowRankBias,
    _cluster_candidates,
    choose_method,
    dilate,
    equal_size_candidates,
    neighbors_to_edge_index,
)
from vig_pyg.graph.relative_pos import relative_position_bias, relative_position_factors

__all__ = ["GridKNNGraph"]


class GridKNNGraph(nn.Module):
    """ViG's dynamic graph over the ``H x W`` patch grid of each image in a batch.

    Every forward pass joins each query node to ``k`` of its ``k * dilation`` nearest key nodes (by
    L2-normalised features), within its own image. With ``relative_pos_dim`` set, Pyramid ViG's
    relative-position term for a grid of that many channels is added to the distance; for the planned
    ``grid_size`` it is precomputed (a non-persistent buffer), for other grids computed on first use.

    When an input is smaller than the one the dilation was planned for, the dilation is lowered to what
    the key nodes allow (``keys // k``), as the official models derive their largest dilation from the
    node count; at the planned size nothing changes.

    The forward pass has no Python branch on tensor values: ``torch.compile`` runs it without graph breaks
    and ``torch.export`` captures it (the torch_cluster back-end as a custom op).

    Args:
        k: neighbours per node.
        dilation: dilation ``d``.
        reduce_ratio: the key nodes are the grid average-pooled by this factor (Pyramid ViG's ``r``).
        relative_pos_dim: channel count of the relative-position term, or ``None`` for none.
        stochastic: stochastic dilation in training.
        epsilon: its probability.
        method: kNN back-end (``"auto"``, ``"dense"`` or ``"torch_cluster"``).
        grid_size: the ``(H, W)`` the model is planned for (precomputes the relative-position term).
    """

    def __init__(
        self,
        k: int = 9,
        dilation: int = 1,
        reduce_ratio: int = 1,
        relative_pos_dim: int | None = None,
        stochastic: bool = False,
        epsilon: float = 0.2,
        method: KNNMethod = "auto",
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if method not in ("auto", "dense", "torch_cluster"):
            raise ValueError(f"unknown kNN method {method!r}; choose 'auto', 'dense' or 'torch_cluster'")
        self.k, self.dilation, self.reduce_ratio = k, dilation, reduce_ratio
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

    def forward(self, nodes: Tensor, keys: Tensor, batch_size: int, height: int, width: int) -> Tensor:
        """Edge index ``(2, B * H * W * k)``, sorted by target, ``k`` per target.

        Args:
            nodes: ``(B * H * W, C)`` query node features (raster order per image).
            keys: ``(B * M, C)`` key node features (``nodes`` itself when ``reduce_ratio == 1``).
            batch_size, height, width: the grid.
        """
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
            return neighbors_to_edge_index(nbr)

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
