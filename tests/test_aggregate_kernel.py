"""The neighbour-max operators: compiled kernels against the PyTorch computations they replace, the
operators' autograd and fake kernels, and their callers (MRConv, gather_max) with either CPU kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vig_pyg import kernels, ops
from vig_pyg.graph import Graph, knn_graph
from vig_pyg.nn import MRConv
from vig_pyg.nn.aggr import gather_max
from vig_pyg.ops import max_relative, neighbor_max
from vig_pyg.ops.aggregate import interleave

kernel = pytest.mark.skipif(
    not kernels.available(),
    reason="compiled kernels not built: run `vig-pyg kernels --build` (make does)",
)


def reference(x_src: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over each row's k gathered neighbours and the first neighbour holding it (torch.max's pick)."""
    gathered = x_src.index_select(0, index).view(-1, k, x_src.size(1))
    best = gathered.amax(1)
    first = (gathered == best.unsqueeze(1)).to(torch.uint8).argmax(1)  # first True
    return best, first.to(torch.uint8)


def neighbors(num_src: int, num_dst: int, k: int) -> torch.Tensor:
    return torch.randint(0, num_src, (num_dst * k,))


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("num_src", "num_dst", "k", "c"),
    [(1, 1, 1, 1), (10, 7, 3, 5), (50, 80, 9, 96), (30, 20, 27, 13), (40, 3, 256, 8), (196, 49, 9, 384)],
)
def test_neighbor_max_kernel_equals_gather_and_amax(num_src, num_dst, k, c, dtype) -> None:
    x = torch.randint(-4, 4, (num_src, c)).to(dtype)  # small integers: many exact ties
    index = neighbors(num_src, num_dst, k)
    best, pos = torch.ops.vig_pyg_cpu.neighbor_max(x, index, k, True)
    ref_best, ref_pos = reference(x, index, k)
    assert best.dtype == dtype and pos.dtype == torch.uint8
    assert torch.equal(best, ref_best) and torch.equal(pos, ref_pos)
    assert torch.equal(torch.ops.vig_pyg_cpu.neighbor_max(x, index, k, False)[0], ref_best)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_relative_kernel_equals_interleaved_max_minus_centre(dtype) -> None:
    x_src, x_dst = torch.randn(60, 24, dtype=dtype), torch.randn(45, 24, dtype=dtype)
    index = neighbors(60, 45, 9)
    h, pos = torch.ops.vig_pyg_cpu.max_relative(x_src, x_dst, index, 9, True)
    best, ref_pos = reference(x_src, index, 9)
    assert torch.equal(h, interleave(x_dst, best - x_dst)) and torch.equal(pos, ref_pos)
    assert h.shape == (45, 48)


@kernel
def test_kernels_propagate_nan_and_infinities_like_amax() -> None:
    x = torch.randn(20, 9)
    x[3, 2] = x[5, 2] = float("nan")
    x[4, :4] = float("inf")
    x[6, 4:] = float("-inf")
    index = torch.tensor([0, 3, 5, 4, 6, 6, 7, 5, 3, 6, 6, 6])  # 4 rows of k = 3
    best, pos = torch.ops.vig_pyg_cpu.neighbor_max(x, index, 3, True)
    ref_best, _ = reference(x, index, 3)
    assert torch.equal(best.isnan(), ref_best.isnan())
    assert torch.equal(best.nan_to_num(), ref_best.nan_to_num())
    assert pos[0, 2] == 1 and pos[2, 2] == 1  # the first NaN wins
    assert torch.equal(best[3, 4:], x[6, 4:])  # all -inf


@kernel
def test_kernels_take_strided_inputs_and_empty_graphs() -> None:
    x_src = torch.randn(16, 30).t()  # (30, 16), not contiguous
    x_dst = torch.randn(16, 20).t()
    edge_index = torch.stack([neighbors(30, 20, 4), torch.arange(20).repeat_interleave(4)])
    index = edge_index[0]  # a row of a (2, E) tensor
    h, _ = torch.ops.vig_pyg_cpu.max_relative(x_src, x_dst, index, 4, False)
    best, _ = reference(x_src.contiguous(), index, 4)
    assert torch.equal(h, interleave(x_dst, best - x_dst))
    empty, pos = torch.ops.vig_pyg_cpu.neighbor_max(x_src, index[:0], 4, True)
    assert empty.shape == (0, 16) and pos.shape == (0, 16)


@kernel
def test_kernels_reject_bad_input() -> None:
    x, index = torch.randn(10, 4), torch.randint(0, 10, (12,))
    op = torch.ops.vig_pyg_cpu.neighbor_max
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, torch.tensor([0, 10, 1]), 3, False)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, torch.tensor([0, -1, 1]), 3, False)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, index, 0, False)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, torch.zeros(257, dtype=torch.long), 257, False)
    with pytest.raises(RuntimeError, match="multiple of k"):
        op(x, index, 5, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), index, 3, False)
    with pytest.raises(RuntimeError, match="int64"):
        op(x, index.int(), 3, False)
    with pytest.raises(RuntimeError, match="x_dst must be"):
        torch.ops.vig_pyg_cpu.max_relative(x, torch.randn(3, 4), index, 3, False)
    with pytest.raises(RuntimeError, match="dtype of x_src"):
        torch.ops.vig_pyg_cpu.max_relative(x, torch.randn(4, 4, dtype=torch.float64), index, 3, False)


@kernel
def test_callers_equal_with_and_without_kernels() -> None:
    x_src, x_dst = torch.randn(70, 12), torch.randn(50, 12)
    index = neighbors(70, 50, 6)
    with_kernels = (neighbor_max(x_src, index, 6, positions=True), max_relative(x_src, x_dst, index, 6, True))
    with ops.pytorch_kernels():
        without = (neighbor_max(x_src, index, 6, positions=True), max_relative(x_src, x_dst, index, 6, True))
    for (a, pa), (b, pb) in zip(with_kernels, without):
        assert torch.equal(a, b) and torch.equal(pa, pb)


@kernel
@pytest.mark.parametrize("bipartite", [False, True])
def test_mrconv_same_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch, bipartite: bool) -> None:
    torch.manual_seed(0)
    conv = MRConv(16, 32)
    conv.nn.norm.running_mean.uniform_(-1, 1)
    x = torch.randn(90, 16)
    y = torch.randn(30, 16) if bipartite else None
    edge_index = knn_graph(x, 7, y=y, method="dense")
    inputs = (y, x) if bipartite else x
    state = {name: t.clone() for name, t in conv.state_dict().items()}

    def run() -> tuple[torch.Tensor, ...]:
        conv.load_state_dict(state)  # the training forward updates the running statistics
        conv.eval()
        with torch.no_grad():
            out_eval = conv(inputs, Graph.k_regular(edge_index, 7))
        conv.train()
        leaves = [t.clone().requires_grad_() for t in ((y, x) if bipartite else (x,))]
        out = conv(tuple(leaves) if bipartite else leaves[0], Graph.k_regular(edge_index, 7))
        grads = torch.autograd.grad(out.square().sum(), [*leaves, *conv.parameters()])
        return (out_eval, out, *grads)

    calls = []
    op = torch.ops.vig_pyg_cpu.max_relative

    def spy(*args):
        calls.append(args[3])
        return op(*args)

    monkeypatch.setattr(torch.ops.vig_pyg_cpu, "max_relative", spy)
    with_kernels = run()
    assert calls == [7, 7]  # eval, and the training forward (positions for backward)
    with ops.pytorch_kernels():
        without = run()
    assert len(calls) == 2
    for a, b in zip(with_kernels, without):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@kernel
def test_gather_max_gradient_same_with_and_without_kernels() -> None:
    x = torch.randint(-2, 2, (40, 8)).float().requires_grad_()  # ties: the first winner gets the gradient
    edge_index = torch.stack([neighbors(40, 25, 5), torch.arange(25).repeat_interleave(5)])
    grad_out = torch.randn(25, 8)
    with_kernels = torch.autograd.grad(gather_max(x, edge_index, 5), x, grad_out)[0]
    with ops.pytorch_kernels():
        without = torch.autograd.grad(gather_max(x, edge_index, 5), x, grad_out)[0]
    assert torch.equal(without, with_kernels)


@pytest.mark.parametrize("positions", [True, False])
def test_operators_autograd_and_fake_kernels(positions: bool) -> None:
    """opcheck (schema, fake kernel, autograd registration) and gradcheck; without positions in the
    forward, backward finds the winners again from x_src."""
    x_src = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    index = neighbors(30, 20, 4)
    torch.library.opcheck(torch.ops.vig_pyg.neighbor_max.default, (x_src, index, 4, positions))
    torch.library.opcheck(torch.ops.vig_pyg.max_relative.default, (x_src, x_dst, index, 4, positions))
    assert torch.autograd.gradcheck(lambda s: ops.neighbor_max(s, index, 4, positions)[0], (x_src,))
    assert torch.autograd.gradcheck(
        lambda s, d: ops.max_relative(s, d, index, 4, positions)[0], (x_src, x_dst)
    )


def test_operators_compile_and_export_as_themselves() -> None:
    """torch.compile and torch.export keep the operators (so the CPU kernel runs there too); ONNX's
    decomposition table turns them back into PyTorch ops."""
    x_src, x_dst, index = torch.randn(30, 6), torch.randn(20, 6), neighbors(30, 20, 4)

    class MR(torch.nn.Module):
        def forward(self, x_src: torch.Tensor, x_dst: torch.Tensor) -> torch.Tensor:
            return ops.max_relative(x_src, x_dst, index, 4, False)[0]

    expected = MR()(x_src, x_dst)
    assert torch.equal(torch.compile(MR(), fullgraph=True)(x_src, x_dst), expected)
    program = torch.export.export(MR(), (x_src, x_dst))
    assert torch.ops.vig_pyg.max_relative.default in {n.target for n in program.graph.nodes}
    table = torch.export.default_decompositions()
    table.update(ops.decompositions())
    plain = program.run_decompositions(table)
    assert not any(str(n.target).startswith("vig_pyg") for n in plain.graph.nodes)
    assert torch.equal(plain.module()(x_src, x_dst), expected)


def test_environment_variable_keeps_the_kernels_unloaded() -> None:
    code = (
        "import torch, vig_pyg.ops as o, vig_pyg.kernels as k; "
        "print(k.available(), hasattr(torch.ops.vig_pyg_cpu, 'max_relative'), o.cpu_kernels())"
    )
    env = {**os.environ, "VIG_PYG_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "pytorch"]
