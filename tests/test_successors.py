"""MobileViG (and the axial graph builders MobileViG and GreedyViG use): official parity, counts, keys."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES

import vig_pyg
from vig_pyg.graph import DAGCGraph, PatchGrid, SVGAGraph, image_to_nodes
from vig_pyg.models.checkpoint import to_official
from vig_pyg.nn import ConcatMRConv

SUCCESSORS = FIXTURES / "successors"
MOBILEVIG = ["mobilevig_ti", "mobilevig_s", "mobilevig_m", "mobilevig_b"]
PAPER_GMACS = {"mobilevig_ti": 0.7, "mobilevig_s": 1.0, "mobilevig_m": 1.5, "mobilevig_b": 2.8}


def roll_h(x: torch.Tensor, s: int) -> torch.Tensor:  # the official code's roll: row h gets row h - s
    return torch.cat([x[:, :, -s:], x[:, :, :-s]], dim=2)


def roll_w(x: torch.Tensor, s: int) -> torch.Tensor:
    return torch.cat([x[:, :, :, -s:], x[:, :, :, :-s]], dim=3)


def svga_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """MobileViG's MRConv4d aggregation, as the official code computes it on a (B, C, H, W) map."""
    x_j = x - x
    for s in range(k, x.size(2), k):
        x_j = torch.max(x_j, x - roll_h(x, s))
    for s in range(k, x.size(3), k):
        x_j = torch.max(x_j, x - roll_w(x, s))
    return x_j


def dagc_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """GreedyViG's DynamicMRConv4d aggregation (L1 distances, unbiased std, half-map shift)."""
    h, w = x.shape[2:]
    rolled = roll_w(roll_h(x, -(-h // 2)), -(-w // 2))
    norm = (x - rolled).abs().sum(1, keepdim=True)
    threshold = norm.mean(dim=(2, 3), keepdim=True) - norm.std(dim=(2, 3), keepdim=True)
    x_j = x - x
    for roll, size in ((roll_h, h), (roll_w, w)):
        for s in range(0, size, k):
            xr = roll(x, s) if s else x
            mask = ((x - xr).abs().sum(1, keepdim=True) < threshold).to(x.dtype)
            x_j = torch.max(x_j, (xr - x) * mask)
    return x_j


@pytest.mark.parametrize("shape", [(2, 8, 7, 7), (1, 6, 5, 9), (2, 4, 14, 14)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_axial_builders_with_concat_mr_equal_the_official_maps(shape, k: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    b, c, h, w = shape
    nodes, grid = image_to_nodes(x), PatchGrid(b, h, w)
    for builder, sign, reference in ((SVGAGraph(k), -1, svga_reference), (DAGCGraph(k), 1, dagc_reference)):
        conv = ConcatMRConv(c, 2 * c, sign=sign, act=None, norm=None).eval()
        expected = conv.nn(torch.cat([nodes, image_to_nodes(reference(x, k))], dim=-1))
        graph = builder(nodes, grid)
        assert graph.k is not None  # k-regular: the fast path
        torch.testing.assert_close(conv(nodes, graph), expected)
        torch.testing.assert_close(conv(nodes, graph.edge_index), expected)  # and PyG's scatter path


def _official_file(tmp_path, name: str):
    fx = torch.load(SUCCESSORS / f"{name}.pt", weights_only=True)
    path = tmp_path / f"{name}.pth.tar"
    torch.save({"state_dict": fx["state_dict"], "epoch": 1}, path)  # the authors' checkpoint layout
    return fx, path


def test_mobilevig_fixture_parity_through_create_model(tmp_path) -> None:
    fx, path = _official_file(tmp_path, "mobilevig_tiny")
    kwargs = fx["config"]["kwargs"]  # the official constructor's arguments
    model = vig_pyg.create_model("mobilevig_ti", pretrained=str(path), **kwargs).eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(fx["input"])
        logits = model.forward_head(final)
    torch.testing.assert_close(logits, fx["logits"], rtol=0, atol=1e-4)
    # Official features: every entry of local_backbone, then of backbone; ours: the four stage ends.
    lb = kwargs["local_blocks"]
    ends = [lb[0] - 1, lb[0] + lb[1], lb[0] + lb[1] + 1 + lb[2], len(fx["stage_features"]) - 1]
    for ours, i in zip(feats, ends):
        torch.testing.assert_close(ours, fx["stage_features"][i], rtol=0, atol=1e-4)


def test_mobilevig_other_sizes_and_training() -> None:
    model = vig_pyg.create_model("mobilevig_test", num_classes=5)
    for size in ((64, 64), (96, 128), (100, 70)):  # any size, non-square
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, *size)).shape == (1, 5)
    model.train()
    out = model(torch.randn(2, 3, 96, 96))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    features = vig_pyg.create_model("mobilevig_test", features_only=True)(torch.randn(1, 3, 96, 96))
    assert [f.shape[1:] for f in features] == [(16, 24, 24), (24, 12, 12), (32, 6, 6), (48, 3, 3)]


def test_distillation_head() -> None:
    model = vig_pyg.create_model("mobilevig_test", num_classes=4).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        head = model.head
        expected = (head.classifier(pooled) + head.dist_classifier(pooled)) / 2
        torch.testing.assert_close(model(x), expected)
    model.train()
    model.set_distilled_training(True)
    out, dist = model(x)
    assert out.shape == dist.shape == (2, 4)
    plain = vig_pyg.create_model("mobilevig_ti", num_classes=10, distillation=False)
    assert plain.head.dist_classifier is None and "head.dist_classifier.weight" not in plain.state_dict()


@pytest.mark.parametrize("name", MOBILEVIG)
def test_mobilevig_counts_and_keys(name: str) -> None:
    official = json.loads((SUCCESSORS / "successor_keys.json").read_text())[name]
    model = vig_pyg.create_model(name, gemm="linear")
    stats = vig_pyg.model_stats(model)
    assert stats["params"] == official["params"]  # with dist_head
    mapping = model.official_key_map()
    assert sorted(mapping.values()) == sorted(k for k, _ in official["keys"])  # every key, both ways
    shapes = dict((k, tuple(s)) for k, s in official["keys"])
    back = to_official(model.state_dict(), model)
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes
    # The papers give MACs to one decimal: ours round to them (0.66, 0.98, 1.49, 2.79 G).
    assert round(stats["macs"] / 1e9, 1) == PAPER_GMACS[name]


def test_axial_builders_inside_vig_models() -> None:
    for graph in ("svga", "dagc"):
        model = vig_pyg.create_model("pvig_test", num_classes=3, graph=graph, conv="mr_concat")
        model.train()(torch.randn(2, 3, 96, 96)).sum().backward()
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)
        assert type(model.graphers()[0].graph).__name__ == {"svga": "SVGAGraph", "dagc": "DAGCGraph"}[graph]
