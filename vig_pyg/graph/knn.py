"""k-nearest-neighbour graphs in feature space, as ViG builds them.

ViG joins every node to the ``k`` nearest of its ``k * d`` nearest key nodes (dilation ``d``: sorted
positions ``0, d, 2d, ...``), searching on L2-normalised features and, in Pyramid ViG, adding a fixed
relative-position term to the squared distance before ranking. Two exact back-ends answer the search:

* ``"dense"``: a batched distance matrix and ``topk``. Equal-size graphs are searched as one
  ``(B, N, M)`` batch; ragged batches are padded and the padding masked out.
* ``"torch_cluster"``: :func:`torch_cluster.knn` (a k-d tree per graph on CPU, brute force on CUDA), for
  any batch and for graphs too large for a dense distance matrix.

``method="auto"`` picks between them; both return the same edges on inputs without distance ties.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vig_pyg.ops import knn_topk

__all__ = [
    "KNNMethod",
    "LowRankBias",
    "choose_method",
    "dense_knn",
    "dilate",
    "equal_size_candidates",
    "knn_graph",
    "neighbors_to_edge_index",
]

KNNMethod = Literal["auto", "dense", "torch_cluster"]
_METHODS = ("auto", "dense", "torch_cluster")

# Above this many distance-matrix entries per graph, "auto" leaves the dense back-end for the k-d tree:
# one graph's (N, M) float32 matrix would need more than 256 MiB. (Per graph, not per batch, so that the
# choice never depends on the batch size, which may be a symbolic dimension in an exported program.)
DENSE_MAX_ENTRIES = 2**26
# k-d trees beat a dense search only in low dimensions (point clouds); at ViG's feature widths
# (48 to 1024 channels) the batched matmul measured 2.6x to 20x faster on CPU.
KDTREE_MAX_DIM = 8


class LowRankBias(NamedTuple):
    r"""A distance bias of the form :math:`b_{ij} = -\langle q_i, k_j \rangle`.

    Pyramid ViG's relative-position term has this form, which lets a plain Euclidean search reproduce
    it: appending :math:`q_i` to the queries and :math:`k_j` (plus one coordinate that equalises the
    keys' norms) to the keys adds :math:`b_{ij}` plus a per-query constant to every squared distance.

    Args:
        query: ``(N, D)``, one row per query node of a graph.
        key: ``(M, D)``, one row per key node of a graph.
    """

    query: Tensor
    key: Tensor

    def dense(self) -> Tensor:
        """The ``(N, M)`` bias matrix."""
        return -(self.query @ self.key.t())


def dilate(nbr: Tensor, k: int, dilation: int, *, stochastic: bool = False, epsilon: float = 0.2) -> Tensor:
    """Keep ``k`` of the ``k * dilation`` sorted candidates in the last dimension of ``nbr``.

    Deterministic dilation keeps positions ``0, d, 2d, ...``. Stochastic dilation (training only; the
    caller decides) instead keeps, with probability ``epsilon``, one random subset of ``k`` positions
    shared by every node, as the official code does. The choice is made with tensor ops, not a Python
    branch on a tensor, so tracing sees one graph.
    """
    if dilation == 1 and not stochastic:
        return nbr
    regular = torch.arange(0, k * dilation, dilation, device=nbr.device)
    if stochastic:
        random_subset = torch.randperm(k * dilation, device=nbr.device)[:k]
        use_random = torch.rand((), device=nbr.device) < epsilon
        regular = torch.where(use_random, random_subset, regular)
    return nbr.index_select(-1, regular)


def dense_knn(
    x: Tensor, y: Tensor | None, k: int, bias: Tensor | None = None, key_mask: Tensor | None = None
) -> Tensor:
    """Indices of the ``k`` nearest keys of every query, nearest first.

    Args:
        x: ``(B, N, C)`` queries. They should already be L2-normalised if ViG's metric is wanted.
        y: ``(B, M, C)`` keys, or ``None`` to search ``x`` against itself.
        k: neighbours per query (include the dilation factor: ``k * d``).
        bias: optional ``(N, M)`` (or broadcastable ``(B, N, M)``) term added to the squared distance.
        key_mask: optional ``(B, M)`` bool, ``False`` for padding keys that must never be chosen.

    Returns:
        ``(B, N, k)`` int64 key indices local to each graph.
    """
    keys = x if y is None else y
    # Rank by -(|x|^2 - 2 x.y + |y|^2 + bias). |x|^2 is the same for all keys of a query, so it is left
    # out, and the rest is one batched matmul that writes the score matrix once: queries get a
    # coordinate 1, keys are doubled and get -|y|^2, and the bias enters as the matmul's input (beta=-1).
    # Building the per-key offset as a (B, N, M) tensor instead cost three more passes over the largest
    # tensor of the search (5x slower at Pyramid ViG's first stage, mostly in page faults).
    key_offset = (keys * keys).sum(-1, keepdim=True).neg_()  # (B, M, 1)
    if key_mask is not None:
        key_offset = key_offset.masked_fill(~key_mask.unsqueeze(-1), float("-inf"))
    queries = torch.cat([x, x.new_ones((*x.shape[:-1], 1))], dim=-1)  # (B, N, C + 1)
    keys = torch.cat([keys * 2, key_offset], dim=-1)  # (B, M, C + 1)
    if bias is None:
        score = torch.bmm(queries, keys.transpose(1, 2))  # (B, N, M)
    else:
        score = torch.baddbmm(bias.to(queries.dtype), queries, keys.transpose(1, 2), beta=-1)
    return knn_topk(score, k)  # (B, N, k), sorted by ascending distance


def neighbors_to_edge_index(nbr: Tensor, key_offset: Tensor | int | None = None) -> Tensor:
    """Turn ``(num_queries, k)`` neighbour indices into a PyG ``edge_index``.

    Row 0 is the neighbour (source), row 1 the centre (target). Edges are sorted by target, ``k`` per
    target in the order of ``nbr``, which is what the k-regular fast path of the graph convs expects.
    """
    n, k = nbr.shape
    src = nbr if key_offset is None else nbr + key_offset
    dst = torch.arange(n, device=nbr.device).repeat_interleave(k)
    return torch.stack([src.reshape(-1), dst], dim=0)


def _check_batch(batch: Tensor | None, num_nodes: int, name: str) -> None:
    if batch is None:
        return
    if not isinstance(batch, Tensor) or batch.dim() != 1 or batch.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D integer tensor assigning each node to a graph")
    if batch.numel() != num_nodes:
        raise ValueError(
            f"{name} has {batch.numel()} entries but there are {num_nodes} nodes; pass one per node"
        )
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"{name} must be sorted (nodes of a graph contiguous), as in a PyG Batch")


def _graph_sizes(batch: Tensor | None, num_nodes: int, num_graphs: int) -> Tensor:
    if batch is None:
        return torch.tensor([num_nodes])
    return torch.bincount(batch.cpu(), minlength=num_graphs)


def knn_graph(
    x: Tensor,
    k: int,
    batch: Tensor | None = None,
    *,
    y: Tensor | None = None,
    batch_y: Tensor | None = None,
    dilation: int = 1,
    bias: Tensor | LowRankBias | None = None,
    stochastic: bool = False,
    epsilon: float = 0.2,
    training: bool = False,
    normalize: bool = True,
    method: KNNMethod = "auto",
    loop: bool = True,
    cosine: bool | None = None,
) -> Tensor:
    r"""ViG's dilated k-nearest-neighbour graph in feature space.

    Each query node :math:`i` is joined to :math:`k` key nodes picked from its :math:`k \cdot d`
    nearest under :math:`\lVert \hat x_i - \hat y_j \rVert^2 + b_{ij}`, where :math:`\hat{\cdot}` is L2
    normalisation and :math:`b` the optional bias. Without ``y`` the keys are the queries themselves
    (self-loops included: a node is its own nearest neighbour); with ``y`` the graph is bipartite, as for
    Pyramid ViG's pooled key nodes. Nodes are only ever joined within their own graph.

    Args:
        x: ``(N, C)`` query node features.
        k: neighbours per node.
        batch: ``(N,)`` sorted graph assignment of ``x`` (``None``: one graph).
        y: ``(M, C)`` key node features for a bipartite graph.
        batch_y: ``(M,)`` sorted graph assignment of ``y``; required with ``batch`` when ``y`` is given.
        dilation: ``d``; keeps sorted positions ``0, d, 2d, ...`` of the ``k * d`` nearest.
        bias: added to the squared distance: an ``(N_g, M_g)`` tensor (dense back-end) or a
            :class:`LowRankBias` (both back-ends), shared by all graphs, which must then have equal sizes.
        stochastic: stochastic dilation; only applied when ``training`` is true.
        epsilon: probability of a random dilation pattern when stochastic.
        training: pass ``module.training``.
        normalize: L2-normalise features before the search (ViG does).
        method: ``"dense"``, ``"torch_cluster"`` or ``"auto"``.
        loop: include every node among its own neighbours (ViG does: it is its own nearest). ``False``
            gives PyG's default, the ``k`` nearest other nodes (graphs without ``y`` only).
        cosine: PyG's name for the metric: ``True`` ranks by cosine distance, which is ``normalize=True``
            (the squared distance of normalised features is ``2 - 2 cos``), ``False`` by Euclidean distance.

    Unlike ``torch_geometric.nn.knn_graph`` (``loop=False``, Euclidean unless ``cosine=True``), the defaults
    are ViG's: normalised features and self loops.

    Returns:
        ``edge_index`` of shape ``(2, N * k)``: row 0 indexes the neighbour (``y`` if given, else ``x``),
        row 1 the centre in ``x``. Edges are sorted by centre, ``k`` per centre, nearest first (for
        deterministic dilation).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(_METHODS)}")
    if cosine is not None:
        normalize = bool(cosine)
    if not loop and y is not None:
        raise ValueError("loop=False drops a node from its own neighbours; a bipartite graph (y) has none")
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be (num_nodes, channels) node features, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 2 or y.size(1) != x.size(1):
            raise ValueError(
                f"y must be (num_keys, {x.size(1)}) to match x's channels, got {getattr(y, 'shape', type(y))}"
            )
        if (batch is None) != (batch_y is None):
            raise ValueError("pass both batch and batch_y for a batched bipartite graph, or neither")
    elif batch_y is not None:
        raise ValueError("batch_y is only meaningful with y (the key nodes of a bipartite graph)")
    _check_batch(batch, x.size(0), "batch")
    if y is not None:
        _check_batch(batch_y, y.size(0), "batch_y")
    if not bool(torch.isfinite(x).all()) or (y is not None and not bool(torch.isfinite(y).all())):
        raise ValueError("node features contain NaN or Inf; the kNN search needs finite features")

    num_graphs = 1 if batch is None else int(batch.max()) + 1 if batch.numel() else 0
    if y is not None and batch_y is not None:
        num_graphs = max(num_graphs, int(batch_y.max()) + 1 if batch_y.numel() else 0)
    query_sizes = _graph_sizes(batch, x.size(0), num_graphs)
    key_sizes = query_sizes if y is None else _graph_sizes(batch_y, y.size(0), num_graphs)
    kd = k * dilation + (0 if loop else 1)  # without loops: one more candidate, then the node itself dropped
    nonempty = query_sizes > 0
    if bool((key_sizes[nonempty] < kd).any()):
        smallest = int(key_sizes[nonempty].min())
        raise ValueError(
            f"k * dilation = {k} * {dilation} neighbours{'' if loop else ' besides the node itself'} asked "
            f"for, but a graph has only {smallest} "
            f"key nodes; lower k or dilation (at most {smallest // k} for k={k}) or use larger inputs"
        )
    equal_sizes = bool((query_sizes == query_sizes[0]).all() and (key_sizes == key_sizes[0]).all())
    if bias is not None:
        if not equal_sizes:
            raise ValueError("a distance bias needs graphs of equal sizes (one bias shared by all graphs)")
        n_g, m_g = int(query_sizes[0]), int(key_sizes[0])
        shape = (bias.query.size(0), bias.key.size(0)) if isinstance(bias, LowRankBias) else tuple(bias.shape)
        if shape != (n_g, m_g):
            raise ValueError(
                f"bias must be ({n_g}, {m_g}) for graphs of {n_g} queries and {m_g} keys, got {shape}"
            )

    if normalize:
        x = F.normalize(x, dim=-1)
        y = None if y is None else F.normalize(y, dim=-1)

    if method == "auto":
        method = choose_method(x.size(1), int(query_sizes.max()), int(key_sizes.max()))
    if method == "torch_cluster":
        if bias is not None and not isinstance(bias, LowRankBias):
            raise ValueError(
                "the torch_cluster back-end takes a bias only as a LowRankBias (a dense bias matrix "
                "cannot be folded into coordinates); use method='dense' or pass LowRankBias(query, key)"
            )
        nbr = _cluster_candidates(x, y, kd, batch, batch_y, bias)
    else:
        nbr = _dense_candidates(x, y, kd, batch, batch_y, bias, query_sizes, key_sizes, equal_sizes)
    if not loop:
        # Each node moved behind its other candidates (a stable sort on "is it the node itself"), then the
        # last candidate (the node, or the farthest if the node was not among them) dropped.
        own = nbr == torch.arange(nbr.size(0), device=nbr.device).unsqueeze(1)
        nbr = nbr.gather(1, own.to(torch.int8).sort(dim=1, stable=True).indices)[:, :-1]
    nbr = dilate(nbr, k, dilation, stochastic=stochastic and training, epsilon=epsilon)
    return neighbors_to_edge_index(nbr)


def choose_method(channels: int, max_queries: int, max_keys: int) -> str:
    """``"auto"``'s choice: the k-d tree for low-dimensional points or huge graphs, else dense.

    Decided from sizes alone (Python ints), so that traced programs contain no branch on tensor values.
    """
    if channels <= KDTREE_MAX_DIM or max_queries * max_keys > DENSE_MAX_ENTRIES:
        return "torch_cluster"
    return "dense"


def equal_size_candidates(
    x: Tensor, y: Tensor | None, kd: int, num_graphs: int, bias: Tensor | None
) -> Tensor:
    """``(N, kd)`` global key indices, nearest first, for ``num_graphs`` graphs of equal sizes.

    ``x`` (``(num_graphs * n, C)``) and ``y`` (``(num_graphs * m, C)`` or ``None``) are already normalised.
    """
    n = x.size(0) // num_graphs
    m = n if y is None else y.size(0) // num_graphs
    yk = None if y is None else y.view(num_graphs, m, -1)  # (B, M, C)
    nbr = dense_knn(x.view(num_graphs, n, -1), yk, kd, bias)  # (B, N, kd)
    offset = (torch.arange(num_graphs, device=x.device) * m).view(-1, 1, 1)  # global key ids
    return (nbr + offset).view(-1, kd)


def _dense_candidates(
    x: Tensor,
    y: Tensor | None,
    kd: int,
    batch: Tensor | None,
    batch_y: Tensor | None,
    bias: Tensor | LowRankBias | None,
    query_sizes: Tensor,
    key_sizes: Tensor,
    equal_sizes: bool,
) -> Tensor:
    """``(N, kd)`` global key indices, nearest first."""
    dense_bias = bias.dense() if isinstance(bias, LowRankBias) else bias
    num_graphs = query_sizes.numel()
    if equal_sizes:
        return equal_size_candidates(x, y, kd, num_graphs, dense_bias)
    # Ragged batch: pad every graph to the largest, mask padded keys, drop padded queries.
    from torch_geometric.utils import to_dense_batch

    xq, q_mask = to_dense_batch(x, batch, batch_size=num_graphs)  # (B, Nmax, C)
    if y is None:
        yk, k_mask = None, q_mask
        key_ptr = torch.cat([query_sizes.new_zeros(1), query_sizes.cumsum(0)])
    else:
        yk, k_mask = to_dense_batch(y, batch_y, batch_size=num_graphs)  # (B, Mmax, C)
        key_ptr = torch.cat([key_sizes.new_zeros(1), key_sizes.cumsum(0)])
    nbr = dense_knn(xq, yk, kd, key_mask=k_mask)  # (B, Nmax, kd)
    nbr = nbr + key_ptr[:-1].to(x.device).view(-1, 1, 1)
    return nbr[q_mask]  # (N, kd)


@torch.library.custom_op("vig_pyg::cluster_knn", mutates_args=())
def cluster_knn(queries: Tensor, keys: Tensor, kd: int, batch: Tensor, batch_keys: Tensor) -> Tensor:
    """``(N, kd)`` global key indices of each query's ``kd`` nearest keys (same graph), nearest first.

    torch_cluster's exact search, registered as a ``torch.library`` custom op with a fake (shape-only)
    implementation, so that ``torch.compile`` and ``torch.export`` can trace through it: the output shape
    is known without running the search.
    """
    import torch_cluster

    assign = torch_cluster.knn(
        keys, queries, kd, batch_x=batch_keys, batch_y=batch, num_workers=torch.get_num_threads()
    )  # row 0: query, row 1: key
    query, key = assign[0], assign[1]
    # torch_cluster does not promise an order within a query: sort by (query, distance).
    dist = (queries[query] - keys[key]).pow(2).sum(-1)
    order = torch.argsort(dist)
    order = order[torch.argsort(query[order], stable=True)]
    return key[order].view(queries.size(0), kd)


@cluster_knn.register_fake
def _(queries: Tensor, keys: Tensor, kd: int, batch: Tensor, batch_keys: Tensor) -> Tensor:
    return queries.new_empty((queries.size(0), kd), dtype=torch.long)


def _cluster_candidates(
    x: Tensor,
    y: Tensor | None,
    kd: int,
    batch: Tensor | None,
    batch_y: Tensor | None,
    bias: LowRankBias | None,
) -> Tensor:
    """``(N, kd)`` global key indices, nearest first, from torch_cluster's exact search."""
    keys, batch_keys = (x, batch) if y is None else (y, batch_y)
    queries = x
    if bias is not None:
        queries, keys = _fold_bias(queries, keys, bias, batch, batch_keys)
    if batch is None:
        batch = torch.zeros(queries.size(0), dtype=torch.long, device=x.device)
    if batch_keys is None:
        batch_keys = torch.zeros(keys.size(0), dtype=torch.long, device=x.device)
    return cluster_knn(queries, keys, kd, batch, batch_keys)


def _fold_bias(
    queries: Tensor, keys: Tensor, bias: LowRankBias, batch: Tensor | None, batch_keys: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Append coordinates so that squared Euclidean distance gains ``bias`` (plus a per-query constant).

    ``|[x, q] - [y, k, e]|^2 = |x - y|^2 + |q|^2 + |k|^2 + e^2 - 2 q.k``; choosing
    ``e^2 = c - |k|^2`` makes the key part the constant ``c``, so only ``-2 q.k`` varies with the key.
    Halving ``q`` and ``k`` by ``sqrt(2)`` turns ``-2 q.k`` into the bias ``-q.k``.
    """
    num_graphs_q = queries.size(0) // bias.query.size(0)
    num_graphs_k = keys.size(0) // bias.key.size(0)
    q = (bias.query.to(queries) / 2**0.5).repeat(num_graphs_q, 1)
    k = bias.key.to(keys) / 2**0.5
    k_sq = (k * k).sum(-1, keepdim=True)
    equaliser = (k_sq.max() - k_sq).clamp_min(0).sqrt()
    k = torch.cat([k, equaliser], dim=1).repeat(num_graphs_k, 1)
    queries = torch.cat([queries, q, queries.new_zeros(queries.size(0), 1)], dim=1)
    keys = torch.cat([keys, k], dim=1)
    return queries, keys
