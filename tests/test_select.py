"""The compiled top-k selection kernel against torch.topk, and the operator that dispatches to it."""

from __future__ import annotations

import pytest
import torch

from vig_pyg import kernels, ops
from vig_pyg.graph import knn_graph
from vig_pyg.graph.knn import dense_knn

kernel = pytest.mark.skipif(
    not kernels.available(),
    reason="compiled kernels not built: run `vig-pyg kernels --build` (make does)",
)


def small_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ops.vig_pyg_cpu.small_topk(score, k)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 1, 1), (7, 5, 5), (300, 196, 9), (64, 49, 16), (33, 800, 3), (50, 196, 27), (20, 100, 64)],
)
def test_kernel_equals_topk(rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    score = torch.randn(rows, n, dtype=dtype)
    assert torch.equal(small_topk(score, k), torch.topk(score, k, dim=-1).indices)


@kernel
def test_kernel_batched_and_strided_input() -> None:
    score = torch.randn(3, 40, 50).transpose(1, 2)  # (3, 50, 40), not contiguous
    out = small_topk(score, 7)
    assert out.shape == (3, 50, 7) and out.dtype == torch.long
    assert torch.equal(out, torch.topk(score, 7, dim=-1).indices)


@kernel
def test_kernel_ties_keep_order_of_appearance() -> None:
    heavy = torch.randint(0, 4, (500, 60)).float()  # ties everywhere: many candidates, partitioned
    light = torch.randn(500, 196).mul(8).round()  # some ties among the few candidates, sorted by insertion
    for score, k in [(heavy, 9), (heavy, 30), (light, 9), (light, 27)]:
        out = small_topk(score, k)
        assert torch.equal(score.gather(1, out), torch.topk(score, k, dim=-1).values)
        vals = score.gather(1, out)
        same = vals[:, 1:] == vals[:, :-1]
        assert bool((out[:, 1:] > out[:, :-1])[same].all())  # equal scores: earlier index first
        assert all(len(set(r.tolist())) == k for r in out)


@kernel
def test_kernel_ranks_nan_first_like_topk() -> None:
    score = torch.randn(50, 30)
    score[::3, 4] = float("nan")
    score[1, :] = float("nan")
    score[2, 10:] = float("-inf")
    out = small_topk(score, 6)
    ref = torch.topk(score, 6, dim=-1)
    got = score.gather(1, out)
    assert torch.equal(got.isnan(), ref.values.isnan())
    assert torch.equal(got.nan_to_num(), ref.values.nan_to_num())
    assert bool((out[1] == torch.arange(6)).all())  # all NaN: order of appearance


@kernel
def test_kernel_rows_with_infinities() -> None:
    score = torch.randn(40, 50)
    score[:10, 3:] = float("-inf")  # fewer finite scores than k
    score[10:20, ::2] = float("-inf")
    score[20:30, 7] = float("inf")
    for k in (6, 20):
        out = small_topk(score, k)
        assert torch.equal(score.gather(1, out), torch.topk(score, k, dim=-1).values)
        assert all(len(set(r.tolist())) == k for r in out)
    assert torch.equal(small_topk(score[10:], 6), torch.topk(score[10:], 6, dim=-1).indices)


@kernel
def test_kernel_rejects_bad_input() -> None:
    with pytest.raises(RuntimeError, match="k must be in"):
        small_topk(torch.randn(4, 5), 6)
    with pytest.raises(RuntimeError, match="k must be in"):
        small_topk(torch.randn(4, 5), 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        small_topk(torch.randint(0, 5, (4, 5)), 2)


def test_knn_topk_falls_back_where_the_kernel_does_not_apply() -> None:
    score = torch.randn(20, 70)
    for s, k in [(score.half(), 5), (score.bfloat16(), 5), (score, ops.KERNEL_MAX_K + 1)]:
        assert torch.equal(ops.knn_topk(s, k), torch.topk(s, k, dim=-1).indices)
    grad = score.clone().requires_grad_()
    assert torch.equal(ops.knn_topk(grad, 5), torch.topk(score, 5, dim=-1).indices)


def test_knn_topk_is_one_operator_in_every_runtime() -> None:
    """Eager, compiled and exported code call the same operator (and so the same CPU kernel)."""
    torch.library.opcheck(torch.ops.vig_pyg.knn_topk.default, (torch.randn(6, 30), 4))
    score = torch.randn(2, 40, 30)
    compiled = torch.compile(lambda s: ops.knn_topk(s, 5), fullgraph=True)
    assert torch.equal(compiled(score), ops.knn_topk(score, 5))
    program = torch.export.export(_TopK(), (score,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.vig_pyg.knn_topk.default in targets
    assert torch.equal(program.module()(score), ops.knn_topk(score, 5))


class _TopK(torch.nn.Module):
    def forward(self, score: torch.Tensor) -> torch.Tensor:
        return ops.knn_topk(score, 5)


@kernel
def test_dense_search_same_with_and_without_kernel() -> None:
    x = torch.randn(2, 150, 16)
    y = torch.randn(2, 40, 16)
    bias = torch.rand(150, 40)
    with_kernel = dense_knn(x, y, 9, bias)
    with ops.pytorch_kernels():
        assert ops.cpu_kernels() == "pytorch"
        assert torch.equal(dense_knn(x, y, 9, bias), with_kernel)
    assert ops.cpu_kernels() == "compiled"


@kernel
def test_knn_graph_uses_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    op = torch.ops.vig_pyg_cpu.small_topk

    def spy(score: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return op(score, k)

    monkeypatch.setattr(torch.ops.vig_pyg_cpu, "small_topk", spy)
    x = torch.randn(60, 8 + 16)
    edges = knn_graph(x, 5, dilation=2, method="dense")
    assert calls == [10] and edges.shape == (2, 300)
