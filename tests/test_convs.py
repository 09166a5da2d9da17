"""ViG's graph convolutions against dense computations written directly from the spec's formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vig_pyg
from vig_pyg.graph import Graph, knn_graph
from vig_pyg.nn import EdgeConv, GINConv, GraphSAGE, GroupedLinear, GroupedMLP, MRConv, build_conv, list_convs

CONVS = [MRConv, EdgeConv, GINConv, GraphSAGE]


def dense_mlp(mlp: GroupedMLP, h: torch.Tensor) -> torch.Tensor:
    """Grouped linear as a block-diagonal dense matrix, then BatchNorm (batch or running stats), GELU."""
    lin = mlp.lin
    g, co, ci = lin.groups, lin.out_channels // lin.groups, lin.in_channels // lin.groups
    w = torch.zeros(lin.out_channels, lin.in_channels, dtype=h.dtype)
    for i in range(g):
        w[i * co : (i + 1) * co, i * ci : (i + 1) * ci] = lin.weight[i * co : (i + 1) * co]
    z = h @ w.t() + lin.bias
    bn = mlp.norm
    if bn.training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    return F.gelu(z)


def reference(
    conv: nn.Module, x_src: torch.Tensor, x_dst: torch.Tensor, edge_index: torch.Tensor
) -> torch.Tensor:
    """The spec's update rules (section 3.4), one target at a time, then the MLP on all rows at once."""
    src, dst = edge_index
    n = x_dst.size(0)
    nbrs = [src[dst == i] for i in range(n)]
    if isinstance(conv, MRConv):
        m = torch.stack([(x_src[j] - x_dst[i]).amax(0) for i, j in enumerate(nbrs)])
        h = torch.empty(n, 2 * x_dst.size(1))
        h[:, 0::2], h[:, 1::2] = x_dst, m  # interleaved [x_0, m_0, x_1, m_1, ...]
        return dense_mlp(conv.nn, h)
    if isinstance(conv, EdgeConv):
        # the MLP sees every edge (BatchNorm statistics over edges), then max per target
        rows = torch.cat(
            [torch.cat([x_dst[i].expand(len(j), -1), x_src[j] - x_dst[i]], 1) for i, j in enumerate(nbrs)]
        )
        out = dense_mlp(conv.nn, rows)
        sizes = [len(j) for j in nbrs]
        return torch.stack([part.amax(0) for part in out.split(sizes)])
    if isinstance(conv, GINConv):
        agg = torch.stack([x_src[j].sum(0) for j in nbrs])
        return dense_mlp(conv.nn, (1 + conv.eps) * x_dst + agg)
    if isinstance(conv, GraphSAGE):
        msg = dense_mlp(conv.nn1, x_src[src])  # per edge, edge order
        m = torch.stack([msg[dst == i].amax(0) for i in range(n)])
        return dense_mlp(conv.nn2, torch.cat([x_dst, m], 1))
    raise TypeError(conv)


def randomise(conv: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm and eps values so that every term of the formula matters."""
    for m in conv.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, GroupedLinear):
            m.bias.data.normal_(0, 0.1)
    if isinstance(conv, GINConv):
        conv.eps.data.fill_(0.3)
    return conv


def random_graph(num_src: int, num_dst: int, num_edges: int) -> torch.Tensor:
    """Random edges in which every target has at least one incoming edge."""
    dst = torch.cat([torch.arange(num_dst), torch.randint(num_dst, (num_edges - num_dst,))])
    src = torch.randint(num_src, (num_edges,))
    return torch.stack([src, dst])


def check_forward_and_grad(conv, x_src, x_dst, edge_index, k=None):
    """Forward and input/parameter gradients of ``conv`` equal the reference's (``x_src is x_dst``: plain);
    with ``k``, through the k-regular path (a :meth:`Graph.k_regular`)."""
    plain = x_src is x_dst
    leaves = (
        [x_src.clone().requires_grad_()]
        if plain
        else [x_src.clone().requires_grad_(), x_dst.clone().requires_grad_()]
    )
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    graph = Graph.k_regular(edge_index, k) if k is not None else edge_index
    ours = conv(leaves[0] if plain else tuple(leaves), graph)
    ref = reference(conv, ref_leaves[0], ref_leaves[-1], edge_index)
    assert ours.shape == ref.shape == (x_dst.size(0), conv.out_channels)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    params = list(conv.parameters())
    for a, b in zip(
        torch.autograd.grad(ours, leaves + params, g), torch.autograd.grad(ref, ref_leaves + params, g)
    ):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls", CONVS)
def test_general_graph_equals_reference(cls, training: bool) -> None:
    conv = randomise(cls(8, 16)).train(training)
    x = torch.randn(30, 8)
    check_forward_and_grad(conv, x, x, random_graph(30, 30, 90))


@pytest.mark.parametrize("cls", CONVS)
def test_bipartite_equals_reference(cls) -> None:
    conv = randomise(cls(8, 16)).eval()
    x_src, x_dst = torch.randn(7, 8), torch.randn(20, 8)
    check_forward_and_grad(conv, x_src, x_dst, random_graph(7, 20, 50))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls", CONVS)
def test_k_regular_fast_path(cls, training: bool) -> None:
    """k= takes the (N, k, C) path; it equals both the reference and PyG's general aggregation."""
    conv = randomise(cls(12, 24)).train(training)
    x = torch.randn(40, 12)
    ei = knn_graph(x, 6, dilation=2)
    check_forward_and_grad(conv, x, x, ei, k=6)
    assert torch.allclose(conv(x, Graph.k_regular(ei, 6)), conv(x, ei), atol=1e-5)
    # bipartite kNN graph (pooled keys)
    y = torch.randn(10, 12)
    ei = knn_graph(x, 4, y=y)
    check_forward_and_grad(conv, y, x, ei, k=4)


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("training", [False, True])
def test_edge_conv_k_regular_any_groups(groups: int, training: bool) -> None:
    # The k-regular path rewrites the grouped layer as two dense per-node GEMMs: any group count.
    conv = randomise(EdgeConv(8, 16, groups=groups)).train(training)
    x = torch.randn(30, 8)
    check_forward_and_grad(conv, x, x, knn_graph(x, 5), k=5)


@pytest.mark.parametrize("cls", CONVS)
def test_pair_input_and_edge_permutation(cls) -> None:
    conv = randomise(cls(8, 8)).eval()
    x = torch.randn(25, 8)
    ei = random_graph(25, 25, 80)
    out = conv(x, ei)
    assert torch.allclose(conv((x, x), ei), out, atol=1e-6)
    perm = torch.randperm(ei.size(1))
    assert torch.allclose(conv(x, ei[:, perm]), out, atol=1e-5)


def test_mr_interleaves_channels() -> None:
    """Group g of the MLP sees exactly channels [gC/4, (g+1)C/4) of both x and the max-relative term."""
    conv = MRConv(8, 8, act=None, norm=None).eval()
    x = torch.randn(10, 8)
    ei = knn_graph(x, 3)
    base = conv(x, Graph.k_regular(ei, 3))
    x2 = x.clone()
    x2[:, :2] += 1.0  # channels of group 0 only
    changed = (conv(x2, Graph.k_regular(ei, 3)) - base).abs().amax(0) > 1e-6
    assert changed[:2].all() and not changed[2:].any()


def test_repr() -> None:
    assert repr(MRConv(48, 96)) == "MRConv(48, 96, groups=4)"
    assert repr(EdgeConv(16, 32, groups=2)) == "EdgeConv(16, 32, groups=2)"
    assert repr(GINConv(8, 16)) == "GINConv(8, 16, groups=4)"
    assert repr(GraphSAGE(8, 16)) == "GraphSAGE(8, 16, groups=4)"


def test_reset_parameters() -> None:
    conv = randomise(GINConv(8, 16))
    conv.reset_parameters()
    assert conv.eps.item() == 0.0
    assert torch.equal(conv.nn.norm.weight, torch.ones(16))
    assert torch.equal(conv.nn.lin.bias, torch.zeros(16))


@pytest.mark.parametrize(
    "name", ["gat", "gatv2", "gcn", "sage_pyg", "transformer", "graphconv", "gin_pyg", "edge_pyg"]
)
def test_registry_pyg_convs(name: str) -> None:
    conv = build_conv(name, 8, 16)
    x, y = torch.randn(20, 8), torch.randn(5, 8)
    ei = knn_graph(x, 3)
    assert conv(x, Graph.k_regular(ei, 3)).shape == (20, 16)
    eb = knn_graph(x, 3, y=y)
    out = conv((y, x), Graph.k_regular(eb, 3))
    assert out.shape == (20, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in conv.parameters() if p.requires_grad)


def test_union_graph_for_convs_without_bipartite_support() -> None:
    """GCN cannot take (x_src, x_dst): it runs on the union of both sets, and only the edges given count."""
    conv = build_conv("gcn", 4, 4)
    y, x = torch.randn(3, 4), torch.randn(6, 4)
    ei = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    out = conv((y, x), ei)
    # node 5 depends only on key 2 and itself (GCN's self loop): changing key 0 leaves it alone
    y2 = y.clone()
    y2[0] += 1
    out2 = conv((y2, x), ei)
    assert torch.allclose(out[5], out2[5]) and not torch.allclose(out[0], out2[0])


def test_registry_accepts_classes() -> None:
    from torch_geometric.nn import GATConv

    assert isinstance(build_conv(MRConv, 8, 16), MRConv)
    conv = build_conv(GATConv, 8, 16)
    x = torch.randn(10, 8)
    assert conv(x, knn_graph(x, 3)).shape == (10, 16)
    assert {"mr", "edge", "gin", "sage", "gat", "gcn", "sage_pyg", "transformer"} <= set(list_convs())


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="groups=4 must both divide"):
        GINConv(6, 12)
    with pytest.raises(ValueError, match=r"unknown graph convolution 'mrr'.*Did you mean 'mr'"):
        build_conv("mrr", 8, 8)
    with pytest.raises(TypeError):
        build_conv(3, 8, 8)  # type: ignore[arg-type]
    conv = MRConv(8, 8)
    x = torch.randn(10, 8)
    ei = knn_graph(x, 3)
    with pytest.raises(ValueError, match="multiple of 4 edges"):
        conv(x, Graph.k_regular(ei, 4))
    with pytest.raises(ValueError, match="needs 40 edges for 10 target nodes"):  # k=4 read as k=3's graph
        conv(x, Graph.from_neighbors(torch.zeros(6, 4, dtype=torch.long)))
    # A k-regular graph promises edges grouped by target: a shuffled order is refused, not silently misread.
    shuffled = ei[:, torch.randperm(ei.size(1), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="grouped by target"):
        conv(x, Graph.k_regular(shuffled, 3))
    # A ragged graph (a plain edge_index) is read in any order.
    assert torch.allclose(conv(x, shuffled), conv(x, Graph.k_regular(ei, 3)), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(num_nodes, 8\)"):
        conv(torch.randn(10, 6), ei)
    with pytest.raises(TypeError, match="integer"):
        conv(x, ei.float())
    with pytest.raises(ValueError, match="positive int"):
        MRConv(0, 8)


@pytest.mark.parametrize("cls", CONVS)
def test_pyg_call_contract(cls) -> None:
    """PyG's call: (x, edge_index, size) positionally, sparse adjacencies, EdgeIndex, (x, None)."""
    from torch_geometric import EdgeIndex
    from torch_geometric.utils import to_torch_coo_tensor, to_torch_csr_tensor

    conv = randomise(cls(8, 16)).eval()
    x = torch.randn(20, 8)
    ei = knn_graph(x, 3)
    ref = reference(conv, x, x, ei)
    adj_t = ei.flip(0)  # PyG's convs take the transposed adjacency: row = target
    for edges in (
        ei,
        EdgeIndex(ei, sparse_size=(20, 20)),
        to_torch_csr_tensor(adj_t, size=(20, 20)),
        to_torch_coo_tensor(adj_t, size=(20, 20)),
        Graph.k_regular(ei, 3),
    ):
        assert torch.allclose(conv(x, edges), ref, atol=1e-5)
    assert torch.allclose(conv(x, ei, (20, 20)), ref, atol=1e-5)  # size, PyG's third argument
    assert torch.allclose(conv((x, None), ei), ref, atol=1e-5)


def test_hooks_and_explainer_masks_see_every_message() -> None:
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    conv = randomise(MRConv(8, 16)).eval()
    x = torch.randn(20, 8)
    ei = knn_graph(x, 3)
    calls = []
    handle = conv.register_message_forward_hook(lambda module, inputs, out: calls.append(out.size(0)))
    conv(x, Graph.k_regular(ei, 3))  # a hook: the k-regular graph goes through propagate too
    handle.remove()
    assert calls == [60]
    mask = torch.randn(60)
    set_masks(conv, mask, ei, apply_sigmoid=True)
    masked = conv(x, Graph.k_regular(ei, 3))
    clear_masks(conv)
    unmasked = conv(x, Graph.k_regular(ei, 3))
    assert not torch.allclose(masked, unmasked)
    set_masks(conv, mask, ei, apply_sigmoid=True)
    assert torch.equal(masked, conv(x, ei))
    clear_masks(conv)


def test_group_errors_in_the_users_numbers() -> None:
    with pytest.raises(ValueError, match=r"MRConv\(15, 32, groups=4\).*2 x in_channels = 30"):
        MRConv(15, 32)
    with pytest.raises(ValueError, match=r"GINConv\(6, 12, groups=4\).*in_channels = 6"):
        GINConv(6, 12)


def test_pyg_convs_that_take_an_mlp_and_width_checks() -> None:
    import functools

    from torch_geometric.nn import EdgeConv as PyGEdgeConv
    from torch_geometric.nn import GATConv
    from torch_geometric.nn import GINConv as PyGGINConv

    x = torch.randn(10, 8)
    for cls in (PyGGINConv, PyGEdgeConv):
        assert build_conv(cls, 8, 16)(x, knn_graph(x, 3)).shape == (10, 16)
    with pytest.raises(ValueError, match=r"maps 8 to \(64,\) channels, but the Grapher needs 16"):
        build_conv(functools.partial(GATConv, heads=4), 8, 16)
    model = vig_pyg.create_model(
        "pvig_test", num_classes=3, conv="gat", conv_kwargs={"heads": 2, "concat": False}
    )
    assert model.graphers()[0].graph_conv.conv.heads == 2
