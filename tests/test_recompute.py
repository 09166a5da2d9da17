"""Training-memory paths: recomputation in backward gives the plain layers' results and keeps less."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from knn_margin import separated_input
from torch import nn

import vig_pyg
from vig_pyg.graph import Graph, knn_graph
from vig_pyg.layers import FFN, ConvNorm, Grapher, Stem
from vig_pyg.nn import MRConv
from vig_pyg.nn.aggr import gather_max
from vig_pyg.nn.mlp import grouped_linear
from vig_pyg.nn.recompute import batch_norm_once, norm_act_conv, norm_act_linear, replays_in_backward
from vig_pyg.ops.aggregate import _first_argmax, interleave


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs (params excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def assert_grads_close(a: nn.Module, b: nn.Module, rtol: float = 1e-4) -> None:
    scale = max(p.grad.abs().max().item() for p in b.parameters() if p.grad is not None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=rtol * scale, msg=name)


def without_memory_saving(module: nn.Module) -> nn.Module:
    """``module`` with every block's training-memory operators off: the plain layers, to compare."""
    for m in module.modules():
        if hasattr(m, "memory_saving"):
            m.memory_saving = False
    return module


def assert_buffers_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# -- the winners of a max ----------------------------------------------------------------------------


def test_first_argmax_takes_the_first_of_ties() -> None:
    torch.manual_seed(0)
    gathered = torch.randint(0, 3, (50, 9, 7)).float()  # many ties
    best = gathered.amax(1)
    pos = _first_argmax(gathered, best)
    assert pos.dtype == torch.uint8
    brute = torch.stack([(gathered[:, :, c] == best[:, c : c + 1]).float().argmax(1) for c in range(7)], 1)
    assert torch.equal(pos.long(), brute)


def test_gather_max_gradient_goes_to_the_first_winner() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 4, (30, 6)).float().requires_grad_()  # ties between neighbours
    edge_index = knn_graph(torch.randn(30, 3), k=5)
    grad = torch.randn(30, 6)
    gather_max(x, edge_index, 5).backward(grad)
    # torch.max with indices over the neighbour axis (the official code's op) picks the first winner.
    x2 = x.detach().clone().requires_grad_()
    neighbours = x2[edge_index[0]].view(30, 5, 6)
    best = neighbours.amax(1, keepdim=True)
    first = (neighbours == best).float().argmax(1, keepdim=True)
    neighbours.gather(1, first).squeeze(1).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    # Without ties it is amax's gradient.
    y = torch.randn(30, 6, requires_grad=True)
    y2 = y.detach().clone().requires_grad_()
    gather_max(y, edge_index, 5).backward(grad)
    y2[edge_index[0]].view(30, 5, 6).amax(1).backward(grad)
    torch.testing.assert_close(y.grad, y2.grad)


def test_gather_max_keeps_no_neighbour_tensor() -> None:
    x = torch.randn(200, 32, requires_grad=True)
    edge_index = knn_graph(x.detach(), k=9)
    kept, _ = saved_bytes(lambda: gather_max(x, edge_index, 9))
    assert kept <= edge_index.numel() * 8 + 200 * 32  # indices and one byte per output, not (N, k, C)


# -- norm + act + linear/conv ------------------------------------------------------------------------


def _plain_linear(y, norm, act, weight, bias, groups):
    return grouped_linear(act(norm(y)), weight, bias, groups)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize(
    "act",
    [nn.GELU(), nn.GELU("tanh"), nn.ReLU(), nn.LeakyReLU(0.2), nn.SiLU(), nn.Hardswish(), nn.Identity()],
    ids=lambda a: repr(a),
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_norm_act_linear_equals_plain_layers(groups: int, act: nn.Module, momentum) -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(16, momentum=momentum).train()
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    weight = torch.randn(12, 16 // groups, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    y = torch.randn(40, 16, requires_grad=True)
    norm2 = copy.deepcopy(norm)
    w2, b2, y2 = (t.detach().clone().requires_grad_() for t in (weight, bias, y))
    for _ in range(2):  # two steps: the running statistics must update exactly once per call
        out = norm_act_linear(y, norm, act, weight, bias, groups)
        ref = _plain_linear(y2, norm2, act, w2, b2, groups)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
    for a, b in [(y, y2), (weight, w2), (bias, b2), (norm.weight, norm2.weight), (norm.bias, norm2.bias)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert_buffers_equal(norm, norm2)
    assert norm.num_batches_tracked.item() == 2


@pytest.mark.parametrize("batch_stats", [True, False])
def test_norm_act_operators_pass_opcheck(batch_stats: bool) -> None:
    # The operators' schemas, fake kernels (torch.compile, torch.export) and autograd registrations.
    torch.manual_seed(0)
    y = torch.randn(12, 8, requires_grad=True)
    norm = [torch.rand(8) + 0.5, torch.randn(8), torch.zeros(8), torch.ones(8)]
    norm[0].requires_grad_(), norm[1].requires_grad_()
    weight, bias = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    args = (y, *norm, batch_stats, 1e-5, "gelu", 0.0, weight, bias, 2)
    torch.library.opcheck(torch.ops.vig_pyg.norm_act_linear.default, args)
    conv_w = torch.randn(3, 8, 3, 3, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        y4 = torch.randn(2, 8, 5, 5).contiguous(memory_format=layout).requires_grad_()
        args = (y4, *norm, batch_stats, 1e-5, "gelu", 0.0, conv_w, None, [2, 2], [1, 1])
        torch.library.opcheck(torch.ops.vig_pyg.norm_act_conv.default, args)


def test_ffn_training_compiles_to_the_operator_without_graph_breaks() -> None:
    torch.manual_seed(0)
    ffn = FFN(8, 32).train()
    ffn2 = copy.deepcopy(ffn)
    x = _map(2, 8, 4, 4)
    explained = torch._dynamo.explain(copy.deepcopy(ffn))(x)
    assert explained.graph_break_count == 0
    ops_called = {n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert torch.ops.vig_pyg.norm_act_linear.default in ops_called
    torch._dynamo.reset()
    out = torch.compile(ffn, backend="aot_eager", fullgraph=True)(x)
    ref = without_memory_saving(ffn2)(x.detach().clone().requires_grad_())
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_grads_close(ffn, ffn2)
    assert_buffers_equal(ffn, ffn2)


def test_norm_act_linear_with_frozen_norm() -> None:
    # Fine-tuning with BatchNorm in eval mode: running statistics are used and stay untouched.
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.eval()
    before = copy.deepcopy(norm.state_dict())
    weight = torch.randn(4, 8, requires_grad=True)
    y = torch.randn(10, 8, requires_grad=True)
    y2, w2 = y.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = norm_act_linear(y, norm, nn.GELU(), weight, None)
    ref = F.linear(F.gelu(norm(y2)), w2)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_norm_act_linear_keeps_only_its_input() -> None:
    norm, act = nn.BatchNorm1d(64), nn.GELU()
    weight = nn.Parameter(torch.randn(32, 64))
    y = torch.randn(500, 64, requires_grad=True)
    params = [weight, norm.weight, norm.bias]
    fused, _ = saved_bytes(lambda: norm_act_linear(y, norm, act, weight, None), exclude=params)
    plain, _ = saved_bytes(lambda: F.linear(act(norm(y)), weight), exclude=params)
    assert fused <= y.numel() * 4 + 1024
    assert plain >= 3 * y.numel() * 4


def test_norm_act_linear_replays_its_producer() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(6)
    a = torch.randn(20, 6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    weight = torch.randn(3, 6, requires_grad=True)

    def producer(a, b):
        return a * b + a.square()

    a2, b2, w2 = (t.detach().clone().requires_grad_() for t in (a, b, weight))
    norm2 = copy.deepcopy(norm)
    out = norm_act_linear(None, norm, nn.GELU(), weight, None, recompute_from=(producer, (a, b)))
    ref = F.linear(F.gelu(norm2(producer(a2, b2))), w2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for x, y in [(a, a2), (b, b2), (weight, w2), (norm.weight, norm2.weight)]:
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)
    assert_buffers_equal(norm, norm2)


def test_norm_act_linear_bad_arguments() -> None:
    norm, w = nn.BatchNorm1d(4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="either y or recompute_from"):
        norm_act_linear(None, norm, nn.GELU(), w, None)
    with pytest.raises(ValueError, match="either y or recompute_from"):
        norm_act_linear(torch.randn(3, 4), norm, nn.GELU(), w, None, recompute_from=(lambda: None, ()))
    with pytest.raises(ValueError, match="rows, channels"):
        norm_act_linear(torch.randn(2, 4, 1, 1), norm, nn.GELU(), w, None)
    with pytest.raises(ValueError, match="groups=1"):
        norm_act_conv(torch.randn(1, 4, 5, 5), nn.BatchNorm2d(4), nn.GELU(), nn.Conv2d(4, 4, 3, groups=2))


def test_norm_act_conv_equals_plain_layers() -> None:
    torch.manual_seed(0)
    norm, conv = nn.BatchNorm2d(6), nn.Conv2d(6, 10, 3, stride=2, padding=1)
    y = torch.randn(2, 6, 9, 9, requires_grad=True)
    norm2, conv2 = copy.deepcopy(norm), copy.deepcopy(conv)
    y2 = y.detach().clone().requires_grad_()
    out = norm_act_conv(y, norm, nn.GELU(), conv)
    ref = conv2(F.gelu(norm2(y2)))
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(y.grad, y2.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip([*norm.parameters(), *conv.parameters()], [*norm2.parameters(), *conv2.parameters()]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-4)
    assert_buffers_equal(norm, norm2)


def test_batch_norm_once_updates_once_and_replays() -> None:
    norm = nn.BatchNorm1d(5)
    norm2 = copy.deepcopy(norm)
    y = torch.randn(30, 5)
    z, replay = batch_norm_once(norm, y)
    torch.testing.assert_close(z, norm2(y))
    assert_buffers_equal(norm, norm2)
    before = copy.deepcopy(norm.state_dict())
    torch.testing.assert_close(replay(y, norm.weight, norm.bias), z)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_replay_only_under_eager_autograd() -> None:
    x = torch.randn(3, requires_grad=True)
    assert replays_in_backward(x)
    assert not replays_in_backward(x.detach())
    with torch.no_grad():
        assert not replays_in_backward(x)


def test_memory_saving_is_a_visible_per_model_setting() -> None:
    model = vig_pyg.create_model("pvig_test")
    blocks = [m for m in model.modules() if isinstance(m, (Stem, Grapher, FFN))]
    assert blocks and all(m.memory_saving for m in blocks)
    assert "memory_saving=True" in repr(model)
    model.set_memory_saving(False)
    assert not any(m.memory_saving for m in blocks) and "memory_saving=True" not in repr(model)
    model.set_memory_saving(True)
    assert all(m.memory_saving for m in blocks)
    # An activation with parameters (PReLU's slope) has no fused operator: such blocks stay plain.
    ffn = FFN(8, 16, act="prelu")
    assert not ffn.supports_memory_saving and not ffn.memory_saving
    assert ffn.train()(_map(2, 8, 3, 3)).shape == (2, 8, 3, 3)
    with pytest.raises(ValueError, match="without parameters"):
        norm_act_linear(torch.randn(4, 8), nn.BatchNorm1d(8), nn.PReLU(), torch.randn(2, 8), None)


# -- MRConv ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bipartite", [False, True])
def test_mr_training_equals_brute_force(bipartite: bool) -> None:
    torch.manual_seed(0)
    conv = MRConv(8, 16).train()
    conv2 = copy.deepcopy(conv)
    x = torch.randn(40, 8, requires_grad=True)
    if bipartite:
        keys = torch.randn(15, 8, requires_grad=True)
        edge_index = knn_graph(x.detach(), 4, y=keys.detach())
        inputs, inputs2 = (keys, x), tuple(t.detach().clone().requires_grad_() for t in (keys, x))
    else:
        edge_index = knn_graph(x.detach(), 4)
        inputs, inputs2 = x, x.detach().clone().requires_grad_()
    out = conv(inputs, Graph.k_regular(edge_index, 4))
    x_src, x_dst = inputs2 if bipartite else (inputs2, inputs2)
    neighbours = x_src[edge_index[0]].view(-1, 4, 8)  # autograd's own max: every winner's gradient
    ref = conv2.nn(interleave(x_dst, neighbours.amax(dim=1) - x_dst))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(inputs if bipartite else (inputs,), inputs2 if bipartite else (inputs2,)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert_grads_close(conv, conv2)


def test_mr_replayable_equals_pre_norm_forward() -> None:
    torch.manual_seed(0)
    conv = MRConv(8, 16).train()
    conv2 = copy.deepcopy(conv)
    pre = torch.randn(30, 8, requires_grad=True)
    scale = torch.rand(8, requires_grad=True)
    pre2, scale2 = pre.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    edge_index = knn_graph(pre.detach() * scale.detach(), 5)

    def sources(p, s):
        z = p * s
        return z, z

    fn, tensors = conv.replayable(Graph.k_regular(edge_index, 5), sources, (pre, scale))
    out = fn(*tensors)
    ref = conv2(pre2 * scale2, Graph.k_regular(edge_index, 5), pre_norm=True)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(pre.grad, pre2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale.grad, scale2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.nn.lin.weight.grad, conv2.nn.lin.weight.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k <= 256"):
        conv.replayable(Graph.from_neighbors(torch.zeros(30, 300, dtype=torch.long)), sources, (pre, scale))
    with pytest.raises(ValueError, match="k-regular"):
        conv.replayable(Graph(edge_index), sources, (pre, scale))


# -- blocks and models -------------------------------------------------------------------------------


def _train_both(module: nn.Module, x: torch.Tensor, rtol: float = 1e-4):
    torch.manual_seed(0)
    module2 = copy.deepcopy(module)
    module.train()
    module2.train()
    x2 = x.detach().clone().requires_grad_(x.requires_grad)
    kept, out = saved_bytes(lambda: module(x), exclude=list(module.parameters()))
    without_memory_saving(module2)
    kept_plain, ref = saved_bytes(lambda: module2(x2), exclude=list(module2.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert_grads_close(module, module2, rtol)
    assert_buffers_equal(module, module2)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    return kept, kept_plain


def _map(b, c, h, w):
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


@pytest.mark.parametrize("conv", ["mr", "edge", "gin", "sage", "gat"])
@pytest.mark.parametrize("reduce_ratio", [1, 2])
def test_grapher_training_equals_plain(conv: str, reduce_ratio: int) -> None:
    grapher = Grapher(16, k=4, conv=conv, reduce_ratio=reduce_ratio, relative_pos=True, grid_size=(6, 6))
    kept, kept_plain = _train_both(grapher, _map(2, 16, 6, 6))
    if conv == "mr":  # only fc1's input and linear output and fc2's linear output: 3C of the plain 12C+
        assert kept <= 0.35 * kept_plain
    elif conv in ("gin", "sage"):
        assert kept < kept_plain


def test_ffn_and_stem_training_equal_plain() -> None:
    kept, kept_plain = _train_both(FFN(16, 64), _map(2, 16, 5, 5))
    assert kept <= 0.5 * kept_plain  # input, hidden before its norm, output: 6C of the plain 14C
    stem = Stem(3, (8, 16, 16), (2, 2, 1))
    kept, kept_plain = _train_both(stem, torch.randn(2, 3, 32, 32))
    assert kept < 0.6 * kept_plain


@pytest.mark.parametrize("name", ["pvig_test", "vig_test"])
def test_model_training_equals_plain_and_keeps_under_half(name: str) -> None:
    torch.manual_seed(0)
    model = vig_pyg.create_model(name, num_classes=10, drop_path_rate=0.0)
    size = model.img_size
    # Through a whole network float rounding differs by up to ~3e-4 of the largest gradient (sums over
    # every pixel that cancel); a wrong gradient path would be off by its own size.
    x = separated_input(model, (2, 3, *size))  # the two paths round differently: no neighbour may swap
    kept, kept_plain = _train_both(model, x, rtol=1e-3)
    assert kept <= 0.45 * kept_plain


def test_trunk_is_channels_last_and_pointwise_layers_match_conv() -> None:
    model = vig_pyg.create_model("pvig_test").eval()
    maps = model.forward_intermediates(torch.randn(1, 3, 96, 96), intermediates_only=True)
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    layer = ConvNorm(8, 12)
    nn.init.uniform_(layer.norm.running_var, 0.5, 2)
    x = torch.randn(2, 8, 5, 5)  # any layout works
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        ref = layer.norm(layer.conv(x)) if mode == "train" else None
        if mode == "eval":
            with torch.no_grad():
                ref = layer.norm(layer.conv(x))
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_training_under_bf16_autocast_equals_plain() -> None:
    # Backward runs outside the forward's autocast: the recomputation must re-enter it and the linear
    # layers' gradients come back in bfloat16 precision and float32 dtype, as autograd's own would.
    torch.manual_seed(0)
    model = vig_pyg.create_model("pvig_test", num_classes=10).train()
    model2 = copy.deepcopy(model)
    model2.set_memory_saving(False)
    x = torch.randn(2, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        ref = model2(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    # bfloat16 keeps 8 bits: sums taken in another order differ by ~0.6% of the largest gradient here.
    assert_grads_close(model, model2, 3e-2)
