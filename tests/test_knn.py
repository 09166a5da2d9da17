"""kNN graphs: both back-ends against a brute-force sort written from the definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from vig_pyg.graph import LowRankBias, dilate, knn_graph, relative_position_bias, relative_position_factors

METHODS = ["dense", "torch_cluster"]


def brute_force(x, k, batch=None, y=None, batch_y=None, dilation=1, bias=None):
    """Per query: sort all same-graph keys by (normalised squared distance + bias) in float64."""
    xq = F.normalize(x.double(), dim=-1)
    keys = xq if y is None else F.normalize(y.double(), dim=-1)
    bq = torch.zeros(len(x), dtype=torch.long) if batch is None else batch
    bk = bq if y is None else (torch.zeros(len(y), dtype=torch.long) if batch_y is None else batch_y)
    out = []
    for i in range(len(x)):
        cand = (bk == bq[i]).nonzero().flatten()
        d = ((keys[cand] - xq[i]) ** 2).sum(-1)
        if bias is not None:
            # bias is indexed by the local query/key position within its graph
            qi = i - int((bq < bq[i]).sum())
            local = cand - int((bk < bq[i]).sum())
            d = d + bias[qi, local].double()
        order = torch.argsort(d, stable=True)
        out.append(cand[order][: k * dilation : dilation])
    return torch.stack(out)  # (N, k)


def as_neighbors(edge_index: torch.Tensor, num_targets: int, k: int) -> torch.Tensor:
    assert edge_index.shape == (2, num_targets * k)
    assert torch.equal(edge_index[1], torch.arange(num_targets).repeat_interleave(k))
    return edge_index[0].view(num_targets, k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_single_graph_equals_brute_force(method: str, dilation: int) -> None:
    x = torch.randn(60, 16)
    ei = knn_graph(x, 5, dilation=dilation, method=method)
    nbr = as_neighbors(ei, 60, 5)
    ref = brute_force(x, 5, dilation=dilation)
    assert torch.equal(nbr, ref)  # same neighbours in the same (nearest-first) order
    assert torch.equal(nbr[:, 0], torch.arange(60))  # a node is its own nearest neighbour


@pytest.mark.parametrize("method", METHODS)
def test_batched_equal_sizes_no_cross_edges(method: str) -> None:
    x = torch.randn(4 * 30, 24)
    batch = torch.arange(4).repeat_interleave(30)
    ei = knn_graph(x, 6, batch, dilation=2, method=method)
    assert torch.equal(batch[ei[0]], batch[ei[1]])
    assert torch.equal(as_neighbors(ei, 120, 6), brute_force(x, 6, batch, dilation=2))


@pytest.mark.parametrize("method", METHODS)
def test_ragged_batch(method: str) -> None:
    sizes = [30, 12, 45]
    x = torch.randn(sum(sizes), 10)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    ei = knn_graph(x, 4, batch, dilation=2, method=method)
    assert torch.equal(batch[ei[0]], batch[ei[1]])
    assert torch.equal(as_neighbors(ei, len(x), 4), brute_force(x, 4, batch, dilation=2))


@pytest.mark.parametrize("method", METHODS)
def test_bipartite(method: str) -> None:
    x, y = torch.randn(2 * 40, 12), torch.randn(2 * 10, 12)
    batch, batch_y = torch.arange(2).repeat_interleave(40), torch.arange(2).repeat_interleave(10)
    ei = knn_graph(x, 3, batch, y=y, batch_y=batch_y, dilation=2, method=method)
    assert int(ei[0].max()) < 20  # sources index the key nodes
    assert torch.equal(batch_y[ei[0]], batch[ei[1]])
    assert torch.equal(as_neighbors(ei, 80, 3), brute_force(x, 3, batch, y, batch_y, dilation=2))


@pytest.mark.parametrize("method", METHODS)
def test_ragged_bipartite(method: str) -> None:
    x, y = torch.randn(25 + 16, 8), torch.randn(9 + 4, 8)
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([25, 16]))
    batch_y = torch.repeat_interleave(torch.arange(2), torch.tensor([9, 4]))
    ei = knn_graph(x, 2, batch, y=y, batch_y=batch_y, method=method)
    assert torch.equal(as_neighbors(ei, 41, 2), brute_force(x, 2, batch, y, batch_y))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduce_ratio", [1, 2])
def test_relative_position_bias(method: str, reduce_ratio: int) -> None:
    """The pyramid term, dense or folded into coordinates, ranks like the brute force with the matrix."""
    h = w = 8
    dim = 16
    n, m = h * w, (h // reduce_ratio) * (w // reduce_ratio)
    x = torch.randn(2 * n, dim) * 0.3
    y = torch.randn(2 * m, dim) * 0.3 if reduce_ratio > 1 else None
    batch = torch.arange(2).repeat_interleave(n)
    batch_y = torch.arange(2).repeat_interleave(m) if y is not None else None
    bias = relative_position_bias(dim, h, w, reduce_ratio)
    factors = relative_position_factors(dim, h, w, reduce_ratio)
    assert torch.allclose(factors.dense(), bias, atol=1e-6)
    ref = brute_force(x, 5, batch, y, batch_y, dilation=2, bias=bias)
    arg = factors if method == "torch_cluster" else bias
    ei = knn_graph(x, 5, batch, y=y, batch_y=batch_y, dilation=2, bias=arg, method=method)
    assert torch.equal(as_neighbors(ei, 2 * n, 5), ref)
    # and the bias matters: without it the neighbours differ
    plain = knn_graph(x, 5, batch, y=y, batch_y=batch_y, dilation=2, method=method)
    assert not torch.equal(plain, ei)


@pytest.mark.parametrize("method", METHODS)
def test_float64_features_with_a_float32_bias(method: str) -> None:
    x = torch.randn(2 * 64, 16, dtype=torch.float64) * 0.3
    batch = torch.arange(2).repeat_interleave(64)
    bias = relative_position_bias(16, 8, 8)  # float32
    arg = relative_position_factors(16, 8, 8) if method == "torch_cluster" else bias
    ei = knn_graph(x, 5, batch, bias=arg, method=method)
    assert torch.equal(as_neighbors(ei, 128, 5), brute_force(x, 5, batch, bias=bias))


def test_low_rank_bias_dense_backend() -> None:
    x = torch.randn(36, 8)
    f = relative_position_factors(8, 6, 6)
    a = knn_graph(x, 4, bias=f, method="dense")
    b = knn_graph(x, 4, bias=f.dense(), method="dense")
    assert torch.equal(a, b)


def test_relative_position_matches_official() -> None:
    """The term equals the official frozen parameters stored with the fixtures (C=12..48, r=4,2,1)."""
    stored = torch.load(FIXTURES / "pvig_tiny_relative_pos.pt", weights_only=True)
    cases = {  # key -> (channels, grid side, reduce ratio)
        "backbone.0.0.relative_pos": (12, 56, 4),
        "backbone.2.0.relative_pos": (24, 28, 2),
        "backbone.4.0.relative_pos": (36, 14, 1),
        "backbone.8.0.relative_pos": (48, 7, 1),
    }
    for key, (dim, side, r) in cases.items():
        ours = relative_position_bias(dim, side, side, r)
        assert ours.shape == stored[key].shape[1:]
        assert (ours - stored[key][0]).abs().max() <= 1e-6, key


@pytest.mark.parametrize("method", METHODS)
def test_stochastic_dilation_only_in_training(method: str) -> None:
    x = torch.randn(50, 8)
    regular = knn_graph(x, 4, dilation=3, method=method)
    # not training: stochastic is ignored
    assert torch.equal(knn_graph(x, 4, dilation=3, stochastic=True, epsilon=1.0, method=method), regular)
    # training with epsilon=1: a random subset of the 12 candidates, the same positions for every node
    torch.manual_seed(1)
    ei = knn_graph(x, 4, dilation=3, stochastic=True, epsilon=1.0, training=True, method=method)
    cand = brute_force(x, 12)
    nbr = as_neighbors(ei, 50, 4)
    pos = (cand.unsqueeze(1) == nbr.unsqueeze(2)).int().argmax(-1)  # (N, k) candidate positions
    assert (pos == pos[0]).all()
    assert not torch.equal(nbr, as_neighbors(regular, 50, 4))
    # epsilon=0: always the regular pattern
    assert torch.equal(knn_graph(x, 4, dilation=3, stochastic=True, epsilon=0.0, training=True), regular)


def test_dilate_traceable_choice() -> None:
    nbr = torch.arange(12).repeat(3, 1)
    assert dilate(nbr, 4, 3).tolist() == [[0, 3, 6, 9]] * 3
    torch.manual_seed(0)
    out = dilate(nbr, 4, 3, stochastic=True, epsilon=1.0)
    assert out.shape == (3, 4) and len(set(out[0].tolist())) == 4


def test_auto_picks_an_exact_method() -> None:
    x = torch.randn(100, 32)
    assert torch.equal(knn_graph(x, 5, method="auto"), knn_graph(x, 5, method="dense"))
    p = torch.randn(300, 3)  # low-dimensional: the k-d tree
    assert torch.equal(knn_graph(p, 5, method="auto"), knn_graph(p, 5, method="torch_cluster"))


def test_bad_input() -> None:
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"k \* dilation"):
        knn_graph(x, 5, dilation=5)
    with pytest.raises(ValueError, match="NaN"):
        knn_graph(torch.full((20, 4), float("nan")), 3)
    with pytest.raises(ValueError, match="entries"):
        knn_graph(x, 3, torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match="sorted"):
        knn_graph(x, 3, torch.tensor([1] * 10 + [0] * 10))
    with pytest.raises(TypeError, match="integer"):
        knn_graph(x, 3, torch.zeros(20))
    with pytest.raises(ValueError, match="unknown kNN method"):
        knn_graph(x, 3, method="faiss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(x, 0)
    with pytest.raises(TypeError, match="floating"):
        knn_graph(torch.ones(20, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="channels"):
        knn_graph(x, 3, y=torch.randn(10, 5))
    with pytest.raises(ValueError, match="both batch and batch_y"):
        knn_graph(x, 3, torch.zeros(20, dtype=torch.long), y=torch.randn(10, 4))
    with pytest.raises(ValueError, match="LowRankBias"):
        knn_graph(x, 3, bias=torch.zeros(20, 20), method="torch_cluster")
    with pytest.raises(ValueError, match="bias must be"):
        knn_graph(x, 3, bias=torch.zeros(20, 19))
    with pytest.raises(ValueError, match="equal sizes"):
        knn_graph(
            x, 3, torch.tensor([0] * 8 + [1] * 12), bias=LowRankBias(torch.zeros(8, 2), torch.zeros(8, 2))
        )


@pytest.mark.parametrize("method", ["dense", "torch_cluster"])
def test_pyg_options_loop_and_cosine(method: str) -> None:
    """loop=False and cosine= give PyG's knn_graph (torch_cluster's): the k nearest other nodes."""
    import torch_cluster

    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))  # well-separated 3-D points
    batch = torch.arange(2).repeat_interleave(20)
    ours = knn_graph(x, 4, batch, loop=False, cosine=False, method=method)
    ref = torch_cluster.knn_graph(x, 4, batch, loop=False)
    assert {tuple(e) for e in ours.t().tolist()} == {tuple(e) for e in ref.t().tolist()}
    assert not bool((ours[0] == ours[1]).any()) and torch.equal(
        ours[1], torch.arange(40).repeat_interleave(4)
    )
    cos = knn_graph(x, 4, batch, loop=False, cosine=True, method=method)
    xn = torch.nn.functional.normalize(x, dim=-1)
    ref_cos = set()  # brute force (torch_cluster has no cosine on CPU): most similar others, same graph
    for i in range(40):
        others = [j for j in range(40) if j != i and j // 20 == i // 20]
        ref_cos |= {(j, i) for j in sorted(others, key=lambda j: -float(xn[i] @ xn[j]))[:4]}
    assert {tuple(e) for e in cos.t().tolist()} == ref_cos
    with pytest.raises(ValueError, match="bipartite"):
        knn_graph(x, 4, loop=False, y=x[:10])
