"""Graph builders: the Graph object's promise, each built-in builder against a brute-force definition, and
every builder inside models (training, eval, compile, checkpoints, info, per-block settings)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from knn_margin import MIN_MARGIN, knn_margin

import vig_pyg
from vig_pyg.graph import (
    Graph,
    GraphBuilder,
    GridGraph,
    GridKNNGraph,
    PatchGrid,
    RadiusGraph,
    RandomGraph,
    build_graph,
    list_graphs,
    register_graph,
)
from vig_pyg.graph.builders import grid as grid_module
from vig_pyg.summary import format_summary, model_summary

BUILDERS = ["knn", "grid", "random", "radius"]


def neighbour_lists(graph: Graph, num_targets: int) -> list[list[int]]:
    src, dst = graph.edge_index
    return [src[dst == i].tolist() for i in range(num_targets)]


# -- the Graph object ------------------------------------------------------------------------------------


def test_k_regular_promise_is_checked() -> None:
    nbr = torch.tensor([[1, 2], [0, 2], [0, 1]])
    graph = Graph.from_neighbors(nbr)
    assert graph.k == 2 and graph.edge_index.tolist() == [[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]]
    assert torch.equal(Graph.k_regular(graph.edge_index, 2).edge_index, graph.edge_index)
    with pytest.raises(ValueError, match="grouped by target"):
        Graph.k_regular(graph.edge_index[:, [1, 0, 2, 3, 5, 4]].flip(1), 2)
    with pytest.raises(ValueError, match="multiple of 4 edges"):
        Graph.k_regular(graph.edge_index, 4)
    with pytest.raises(ValueError, match="positive int"):
        Graph.k_regular(graph.edge_index, 0)
    with pytest.raises(TypeError, match="integer tensor"):
        Graph(torch.zeros(2, 3))
    assert Graph(graph.edge_index).k is None  # a plain edge_index is ragged: never read as k-regular
    assert repr(graph) == "Graph(edges=6, k=2)"


# -- each builder against its definition -----------------------------------------------------------------


@pytest.mark.parametrize("reduce_ratio", [1, 2, 3])
def test_grid_is_the_nearest_patches_by_position(reduce_ratio: int) -> None:
    h, w, k = 7, 6, 4
    table = grid_module.nearest_on_grid(h, w, k, reduce_ratio)
    r = reduce_ratio
    kh, kw = (h // r, w // r) if r > 1 else (h, w)
    for node in range(h * w):
        y, x = divmod(node, w)
        keys = sorted(
            range(kh * kw),
            key=lambda j: ((y - (j // kw * r + (r - 1) / 2)) ** 2 + (x - (j % kw * r + (r - 1) / 2)) ** 2, j),
        )
        assert table[node].tolist() == keys[:k]
    if reduce_ratio == 1:
        assert torch.equal(table[:, 0], torch.arange(h * w))  # every patch is its own nearest


def test_grid_builder_is_static_and_batched() -> None:
    builder = GridGraph(k=4, grid_size=(5, 5))
    a = builder(torch.randn(2 * 25, 8), PatchGrid(2, 5, 5))
    b = builder(torch.randn(2 * 25, 8), PatchGrid(2, 5, 5))
    assert a.k == 4 and torch.equal(a.edge_index, b.edge_index)  # features do not matter
    lists = neighbour_lists(a, 50)
    assert lists[25:] == [[j + 25 for j in nb] for nb in lists[:25]]  # image 1: image 0's, offset
    other = builder(torch.randn(30, 8), PatchGrid(1, 5, 6))  # another grid: computed, not the buffer
    assert torch.equal(other.edge_index[0].view(30, 4), grid_module.nearest_on_grid(5, 6, 4))


def test_random_builder_is_fixed_by_its_seed() -> None:
    a = RandomGraph(k=5, seed=3, grid_size=(6, 6))
    nodes = torch.randn(36, 8)
    g1, g2 = a(nodes, PatchGrid(1, 6, 6)), a(torch.randn(36, 8), PatchGrid(1, 6, 6))
    assert torch.equal(g1.edge_index, g2.edge_index)
    assert torch.equal(RandomGraph(k=5, seed=3)(nodes, PatchGrid(1, 6, 6)).edge_index, g1.edge_index)
    assert not torch.equal(RandomGraph(k=5, seed=4)(nodes, PatchGrid(1, 6, 6)).edge_index, g1.edge_index)
    table = g1.edge_index[0].view(36, 5)
    assert all(len(set(row)) == 5 for row in table.tolist())  # distinct neighbours
    assert int(table.max()) < 36 and int(table.min()) >= 0


@pytest.mark.parametrize("reduce_ratio", [1, 2])
def test_radius_is_every_key_within_r_capped(reduce_ratio: int) -> None:
    torch.manual_seed(0)
    r, cap, (b, h, w) = 1.1, 6, (2, 6, 6)
    builder = RadiusGraph(r=r, max_num_neighbors=cap, reduce_ratio=reduce_ratio)
    nodes = torch.randn(b * h * w, 8)
    grid = PatchGrid(b, h, w)
    graph = builder(nodes, grid)
    assert graph.k is None
    keys = builder.key_nodes(nodes, grid)
    m = keys.size(0) // b
    x, y = F.normalize(nodes.double(), dim=-1), F.normalize(keys.double(), dim=-1)
    lists = neighbour_lists(graph, b * h * w)
    degrees = set()
    for i, got in enumerate(lists):
        image = i // (h * w)
        cand = range(image * m, (image + 1) * m)
        dist = {j: float((x[i] - y[j]).norm()) for j in cand}
        ranked = sorted(cand, key=lambda j: dist[j])
        expected = [j for j in ranked[:cap] if dist[j] <= r]
        if not expected:
            expected = ranked[:1]  # the nearest key is always kept
        assert got == expected  # nearest first
        degrees.add(len(got))
    assert len(degrees) > 1  # variable degree


def test_builder_registry() -> None:
    assert set(BUILDERS) <= set(list_graphs())
    with pytest.raises(ValueError, match=r"unknown graph builder 'knnn'.*Did you mean 'knn'"):
        build_graph("knnn")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['radius'\]"):
        build_graph("grid", {"radius": 2}, k=3)
    builder = build_graph(
        "radius", {"r": 0.5}, k=9, dilation=2, channels=8
    )  # block settings it lacks: unused
    assert isinstance(builder, RadiusGraph) and builder.r == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register_graph("knn", GridGraph)
    with pytest.raises(TypeError, match="not a GraphBuilder"):
        build_graph(lambda **_: torch.nn.Identity())


# -- builders inside models ------------------------------------------------------------------------------


class EveryOtherPatch(GraphBuilder):
    """A user-written builder: each node joined to itself and the next ``k - 1`` nodes of its image."""

    regular = True

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k

    def forward(self, nodes: torch.Tensor, grid: PatchGrid) -> Graph:
        n = grid.num_nodes
        local = (torch.arange(n).unsqueeze(1) + torch.arange(self.k)) % n  # (N, k)
        offsets = torch.arange(grid.batch_size).view(-1, 1, 1) * n
        return Graph.from_neighbors((local + offsets).view(-1, self.k).to(nodes.device))


@pytest.fixture(autouse=False)
def custom_builder():
    register_graph("every_other_test", EveryOtherPatch, overwrite=True)
    yield "every_other_test"
    from vig_pyg.graph.builders import _REGISTRY

    _REGISTRY.pop("every_other_test", None)


def _radius_margin(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The smallest gap of a radius decision (in or out of the radius, in or out of the cap) on ``x``."""
    gaps: list[float] = []

    def hook(builder: RadiusGraph, args: tuple) -> None:
        nodes, grid = args
        keys = builder.key_nodes(nodes, grid)
        b = grid.batch_size
        q = F.normalize(nodes.double(), dim=-1).view(b, grid.num_nodes, -1)
        k = F.normalize(keys.double(), dim=-1).view(b, keys.size(0) // b, -1)
        sim = (q @ k.transpose(1, 2)).sort(dim=-1, descending=True).values
        cap = min(builder.max_num_neighbors, sim.size(-1))
        gaps.append(float((sim[..., 1:cap] - (1 - builder.r**2 / 2)).abs().min()) if cap > 1 else math.inf)
        if cap < sim.size(-1):
            gaps.append(float((sim[..., cap - 1] - sim[..., cap]).min()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, RadiusGraph)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return min(gaps, default=math.inf)


def _separated(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    for seed in range(32):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        has_knn = any(isinstance(m, GridKNNGraph) for m in model.modules())
        if min(knn_margin(model, x) if has_knn else math.inf, _radius_margin(model, x)) >= MIN_MARGIN:
            return x
    raise AssertionError("no well-separated input among 32 seeds")


def _tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return vig_pyg.create_model(name, num_classes=10, **kwargs)


@pytest.mark.parametrize("graph", BUILDERS)
def test_every_builder_trains_evaluates_and_compiles(graph: str) -> None:
    # The radius graph's decisions (in or out of r, in or out of the cap) are many more than the kNN's:
    # on the isotropic model's fewer nodes an input separates them all by float32 rounding's 30x.
    model = _tiny("vig_test" if graph == "radius" else "pvig_test", graph=graph, conv="mr")
    assert type(model.graphers()[0].graph).__name__ == type(build_graph(graph, k=9)).__name__
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    model.train()
    loss = F.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    x = _separated(model, (2, 3, 96, 96))
    # A ragged graph's edge count depends on the data: dynamo traces such operators only when asked to.
    ragged = torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=not model.graphers()[0].graph.regular
    )
    with torch.no_grad(), ragged:
        eager = model(x)
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@pytest.mark.parametrize("conv", ["mr", "gin", "sage"])
def test_ragged_graph_compiles_inside_convs(conv: str) -> None:
    # The edge count is a symbolic size (vig_pyg::masked_edges' fake kernel): one graph, same values.
    torch.manual_seed(0)
    layer = vig_pyg.nn.build_conv(conv, 16, 32).eval()
    x, nbr = torch.randn(50, 16), torch.randint(0, 50, (50, 6))
    keep = torch.rand(50, 6) > 0.4

    def run(x, nbr, keep):
        return layer(x, Graph(vig_pyg.ops.masked_edges(nbr, keep)))

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        assert torch._dynamo.explain(run)(x, nbr, keep).graph_break_count == 0
        torch.testing.assert_close(torch.compile(run, fullgraph=True)(x, nbr, keep), run(x, nbr, keep))


@pytest.mark.parametrize("conv", ["edge", "gin", "sage", "gat"])
def test_ragged_graph_with_every_conv(conv: str) -> None:
    # A ragged graph takes each conv's general path in training and eval; the fast path is never used.
    model = _tiny("vig_test", graph="radius", graph_kwargs={"r": 1.2}, conv=conv)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_per_block_k_and_options() -> None:
    ks = [3, 4, 5, 6, 7]
    model = _tiny("pvig_test", k=ks, graph="grid")
    assert [g.graph.k for g in model.graphers()] == ks
    side = model.min_input_size[0]
    assert model._fits(side, side) and not model._fits(side - 1, side - 1)
    # 16 neighbours in the last stage need more than its 3x3 grid at the planned 96x96: a larger input
    big = _tiny("pvig_test", k=[3, 3, 3, 3, 16], gemm="linear")
    assert big.min_input_size[0] > side and big._fits(*big.min_input_size)
    with pytest.raises(ValueError, match="too small"):
        big(torch.randn(1, 3, side, side))
    options = [{"r": 0.5}, {"r": 0.6}, {"r": 0.7}, {"r": 0.8}, {"r": 0.9}]
    radius = _tiny("pvig_test", graph="radius", graph_kwargs=options)
    assert [g.graph.r for g in radius.graphers()] == [0.5, 0.6, 0.7, 0.8, 0.9]
    with pytest.raises(ValueError, match="k needs 5 entries"):
        _tiny("pvig_test", k=[4, 6, 8])
    iso = _tiny("vig_test", k=[4, 5, 6, 7])
    assert iso.ks == [4, 5, 6, 7] and [g.graph.k for g in iso.graphers()] == [4, 5, 6, 7]


def test_builder_shows_in_repr_and_info(custom_builder: str) -> None:
    model = _tiny("pvig_test", graph=custom_builder)
    assert "EveryOtherPatch()" in repr(model)
    summary = model_summary(model)
    # The builder takes k, so it gets the block's (9), as every builder with a k does.
    assert [b.k for b in summary.blocks] == [9] * 5 and summary.blocks[0].graph == ""
    radius = _tiny("pvig_test", graph="radius")
    text = format_summary(model_summary(radius))
    assert "radius r=1 max=16" in text and "RadiusGraph(r=1, max_num_neighbors=16" in repr(radius)
    assert all(b.k is None and b.degree >= 1 for b in model_summary(radius).blocks)


def test_custom_builder_by_name_and_class(custom_builder: str) -> None:
    by_name = _tiny("vig_test", graph=custom_builder)
    by_class = _tiny("vig_test", graph=EveryOtherPatch)
    x = torch.randn(2, 3, 96, 96)
    by_class.load_state_dict(by_name.state_dict())
    with torch.no_grad():
        assert torch.equal(by_name.eval()(x), by_class.eval()(x))
    assert all(isinstance(g.graph, EveryOtherPatch) for g in by_name.graphers())


def test_a_radius_run_reloads_evaluates_and_draws(tmp_path, capsys) -> None:
    import json
    import logging

    from vig_pyg.cli import main

    logger = logging.getLogger("vig_pyg")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        tiny = ["--img-size", "33", "--batch-size", "32", "--limit-train", "64", "--limit-val", "32"]
        graph = ["--graph", "radius", "--graph-option", "r=0.9", "--graph-option", "max_num_neighbors=6"]
        out = tmp_path / "run"
        assert main(["train", "--out", str(out), "--epochs", "1", *tiny, *graph]) == 0
        capsys.readouterr()
        assert main(["eval", str(out / "best.pt"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["count"] == 359  # the whole validation split
        model, info = vig_pyg.train.load_model(out / "best.pt")
        assert info.model_kwargs["graph"] == "radius"
        assert info.model_kwargs["graph_kwargs"] == {"r": 0.9, "max_num_neighbors": 6}
        assert all(isinstance(g.graph, RadiusGraph) and g.graph.r == 0.9 for g in model.graphers())
        assert main(["visualize", str(out / "best.pt")]) == 0
        assert (out / "graph.png").is_file()
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_grid_edge_attr_reaches_convs_that_take_it() -> None:
    builder = GridGraph(k=3, reduce_ratio=2, edge_attr=True)
    graph = builder(torch.randn(2 * 16, 4), PatchGrid(2, 4, 4))
    src, dst = graph.edge_index
    for e in range(graph.num_edges):  # target patch (row, col) to the source key cell's centre
        t, s = int(dst[e]) % 16, int(src[e]) % 4
        expected = [s // 2 * 2 + 0.5 - t // 4, s % 2 * 2 + 0.5 - t % 4]
        assert graph.edge_attr[e].tolist() == expected
    model = _tiny(
        "pvig_test", graph="grid", graph_kwargs={"edge_attr": True}, conv="gat", conv_kwargs={"edge_dim": 2}
    )
    seen = []
    conv = model.graphers()[0].graph_conv.conv
    handle = conv.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("edge_attr")), with_kwargs=True
    )
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 96, 96))
    handle.remove()
    assert seen and seen[0] is not None and seen[0].shape == (24 * 24 * 9, 2)


def test_ragged_models_torch_export_and_onnx_refusal(tmp_path) -> None:
    from vig_pyg.export import export_onnx

    model = _tiny("vig_test", graph="radius").eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x,))  # the edge count: a symbolic size of masked_edges
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
    with pytest.raises(ValueError, match="ONNX export of a ragged graph"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 96, 96))
    assert not (tmp_path / "m.onnx").exists()
