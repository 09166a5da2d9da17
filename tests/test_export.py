"""torch.compile, torch.export, ONNX and torch.fx on every variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from knn_margin import MIN_MARGIN, node_margins, separated_input
from test_parity import load_fixture, model_for, official_state_dict

import vig_pyg
from vig_pyg.export import create_feature_extractor, export_onnx, symbolic_trace
from vig_pyg.graph import GridKNNGraph, PatchGrid
from vig_pyg.layers.blocks import Grapher
from vig_pyg.models import convert_official

ALL = vig_pyg.list_models()
TEST_MODELS = ["vig_test", "pvig_test"]
# The larger variants run the same code as the tiny ones; `make test-slow` checks them too.
LARGE = {"vig_s_224_gelu", "vig_b_224_gelu", "pvig_s_224_gelu", "pvig_m_224_gelu", "pvig_b_224_gelu"}
ALL_MARKED = [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in ALL]


def calibrated(name: str, **kwargs) -> torch.nn.Module:
    """A model whose BatchNorm statistics come from data, so that its outputs have a sane scale."""
    torch.manual_seed(0)
    model = vig_pyg.create_model(name, num_classes=10, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    size = model.img_size
    with torch.no_grad():
        model.train()(torch.randn(4, 3, *size))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("name", ALL_MARKED)
def test_dynamo_no_graph_breaks(name: str) -> None:
    dense = {} if name.startswith("mobilevig") else {"knn_method": "dense"}  # MobileViG: no kNN
    model = vig_pyg.create_model(name, **dense).eval()
    x = torch.randn(1, 3, 96, 96)  # small input keeps the eager pass inside explain cheap
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamo_no_graph_breaks_torch_cluster() -> None:
    """The torch_cluster kNN is a custom op with a fake kernel: dynamo traces through it."""
    model = vig_pyg.create_model("pvig_test", knn_method="torch_cluster").eval()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 96, 96))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("method", ["dense", "torch_cluster"])
@pytest.mark.parametrize("name", TEST_MODELS)
def test_compile_matches_eager(name: str, method: str) -> None:
    model = calibrated(name, knn_method=method)
    x = separated_input(model, (2, 3, *model.img_size))  # inductor's rounding cannot swap a neighbour
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vig_test", pytest.param("pvig_test", marks=pytest.mark.slow)])
def test_compile_training_step_matches_eager(name: str) -> None:
    model = calibrated(name).train()
    x = separated_input(model, (2, 3, *model.img_size))
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(x)
    out_c.square().mean().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_e = model(x)
    out_e.square().mean().backward()
    assert torch.allclose(out_c, out_e, atol=1e-5, rtol=1e-5)
    # Gradients through training-mode BatchNorm sum many terms that cancel (biases before a BatchNorm
    # get exactly zero up to rounding), so inductor's re-associated sums are compared as one vector.
    flat_c = torch.cat([g.flatten() for g in grads_c])
    flat_e = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (flat_c - flat_e).norm() <= 1e-3 * flat_e.norm()


@pytest.mark.parametrize("name", ALL_MARKED)
def test_torch_export(name: str) -> None:
    # The exported program calls the same operators (vig_pyg.ops) and so the same CPU kernels as eager
    # mode: even these random full-size models, whose features blow up until scores tie exactly, agree.
    model = vig_pyg.create_model(name).eval()
    x = torch.randn(1, 3, 96, 96) if name not in TEST_MODELS else separated_input(model, (2, 3, 96, 96))
    program = torch.export.export(model, (x,))
    assert any(str(n.target).startswith("vig_pyg.") for n in program.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_fx_symbolic_trace(name: str) -> None:
    model = vig_pyg.create_model(name).eval()
    gm = symbolic_trace(model)
    if name in TEST_MODELS:
        x = torch.randn(2, 3, *model.img_size)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))


def test_fx_feature_extraction_by_node_name() -> None:
    model = calibrated("pvig_test")
    names = [n.name for n in symbolic_trace(model).graph.nodes]
    # each stage ends with the FFN of its last block, a node named after its module path
    stage_ends = [f"stages_{s}_blocks_{len(stage.blocks) - 1}_ffn" for s, stage in enumerate(model.stages)]
    assert set(stage_ends) <= set(names)
    extractor = create_feature_extractor(model, stage_ends)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 4
    for name, ref in zip(stage_ends, expected):
        assert torch.equal(feats[name], ref)
    with pytest.raises(ValueError, match="no FX node"):
        create_feature_extractor(model, ["nope"])


def test_plain_fx_says_what_to_do() -> None:
    model = vig_pyg.create_model("pvig_test").eval()
    with pytest.raises(TypeError, match=r"vig_pyg\.export\.symbolic_trace"):
        torch.fx.symbolic_trace(model)


def test_traced_forms_keep_train_eval_semantics() -> None:
    """Stochastic dilation and drop path act in training only, in FX-traced and compiled forms too."""
    model = calibrated("pvig_test", stochastic=True, epsilon=1.0, drop_path_rate=0.5)
    x = separated_input(model, (2, 3, 96, 96))  # eval mode: the compiled form's rounding decides nothing
    for run in (symbolic_trace(model), torch.compile(model, fullgraph=True)):
        model.eval()
        with torch.no_grad():
            a, b = run(x), run(x)
            assert torch.equal(a, b)
            assert torch.allclose(a, model(x), atol=1e-5 * float(a.abs().max()), rtol=1e-5)
        model.train()
        with torch.no_grad():
            outs = [run(x) for _ in range(3)]
        assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random: drop path and dilation
    # The kNN graph as FX keeps it (a leaf module): its train/eval switch acts at call time.
    knn = next(m for m in model.modules() if isinstance(m, GridKNNGraph) and m.reduce_ratio == 1)
    knn.dilation = 2
    nodes = torch.randn(2 * 36, knn.relative_pos_dim)
    knn.eval()
    regular = knn(nodes, PatchGrid(2, 6, 6)).edge_index
    assert torch.equal(knn(nodes, PatchGrid(2, 6, 6)).edge_index, regular)
    knn.train()
    # epsilon=1: always a random pattern
    assert not torch.equal(knn(nodes, PatchGrid(2, 6, 6)).edge_index, regular)


@pytest.mark.parametrize("fixture", ["pvig_tiny_mr", "vig_tiny_mr"])
def test_onnx_matches_pytorch_on_official_weights(fixture: str, tmp_path, two_threads) -> None:
    """ONNX Runtime reproduces PyTorch (and the official logits) within 1e-4, for any batch size.

    Official-weight fixtures are used because their kNN decisions are separated by at least 3e-6: with
    random weights a full-size ViG is chaotic (PyTorch itself moves by 0.3 between 1 and 2 threads, as
    near-tied neighbours swap), which would test the weights, not the export.
    """
    import onnxruntime as ort

    fx = load_fixture(fixture)
    model = model_for(fx["config"]).eval()
    model.load_state_dict(convert_official(official_state_dict(fx), model))
    path = export_onnx(model, tmp_path / "m.onnx", (3, 224, 224))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (fx["input"], fx["input"][1:]):
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == ref.shape
        assert abs(out - ref).max() <= 1e-4
    (out,) = session.run(None, {"images": fx["input"].numpy()})
    assert abs(out - fx["logits"].numpy()).max() <= 1e-4


class _UpToFirstGrapher(torch.nn.Module):
    """A model's stem, position embedding and first Grapher: each output node rests on one kNN decision."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.grapher = next(m for m in model.modules() if isinstance(m, Grapher))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grapher(self.model._embed(x))


@pytest.mark.parametrize(
    "name",
    [
        "pvig_ti_224_gelu",
        pytest.param("vig_ti_224_gelu", marks=pytest.mark.slow),
        pytest.param("pvig_s_224_gelu", marks=pytest.mark.slow),
    ],
)
def test_onnx_full_size_variants(name: str, tmp_path) -> None:
    """A full-size variant exports with a dynamic batch axis and runs in ONNX Runtime at any batch size.

    A random full-size ViG is chaotic (a near-tied neighbour swap moves its logits by ~3), so its logits
    are not compared: the whole export is checked for structure and finite outputs, and the numbers are
    compared through the first Grapher, node by node, wherever that node's kNN decision is separated by
    more than rounding (tests/knn_margin.py). Official-weight parity is the test above.
    """
    import onnx
    import onnxruntime as ort

    model = calibrated(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    graph = onnx.load(str(path)).graph
    for value in (*graph.input, *graph.output):
        batch_axis = value.type.tensor_type.shape.dim[0]
        assert batch_axis.dim_param and not batch_axis.HasField("dim_value")  # a named, free batch axis
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        (out,) = session.run(None, {"images": torch.randn(batch, 3, 224, 224, generator=gen).numpy()})
        assert out.shape == (batch, 10) and np.isfinite(out).all()

    head = _UpToFirstGrapher(model).eval()
    sub_path = export_onnx(head, tmp_path / "first_grapher.onnx")
    x = torch.randn(2, 3, 224, 224, generator=gen)
    (got,) = ort.InferenceSession(str(sub_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()}
    )
    with torch.no_grad():
        ref = head(x)
    (margins,) = node_margins(head, x)
    decided = margins >= MIN_MARGIN  # nodes whose neighbours no rounding can change
    assert decided.float().mean() >= 0.9
    per_node = (torch.from_numpy(got) - ref).abs().amax(1).reshape(-1)  # (B * H * W,), the node order
    assert per_node[decided].max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_onnx_refuses_torch_cluster(tmp_path) -> None:
    model = vig_pyg.create_model("pvig_test", knn_method="torch_cluster")
    with pytest.raises(ValueError, match="knn_method='dense'"):
        export_onnx(model, tmp_path / "m.onnx", (3, 96, 96))
    assert not (tmp_path / "m.onnx").exists()
