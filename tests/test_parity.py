"""The official checkpoints' outputs, reproduced: fixtures made by the official code on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES

import vig_pyg
from vig_pyg.graph import Graph, GridKNNGraph
from vig_pyg.models.checkpoint import convert_official, to_official

PYRAMID = ["pvig_tiny_mr", "pvig_tiny_edge", "pvig_tiny_sage", "pvig_tiny_gin"]
ALL = [*PYRAMID, "vig_tiny_mr"]


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def official_state_dict(fx: dict) -> dict:
    sd = dict(fx["state_dict"])
    if fx["config"]["family"] == "pyramid":
        rel = torch.load(FIXTURES / "pvig_tiny_relative_pos.pt", weights_only=True)
        sd.update(
            {k: v for k, v in rel.items() if k in fx["config"]["relative_pos_excluded_from_state_dict"]}
        )
    return sd


def model_for(cfg: dict, **kwargs) -> torch.nn.Module:
    if cfg["family"] == "pyramid":
        return vig_pyg.create_model(
            "pvig_ti_224_gelu",
            channels=tuple(cfg["channels"]),
            blocks=tuple(cfg["blocks"]),
            k=cfg["k"],
            conv=cfg["conv"],
            num_classes=cfg["n_classes"],
            **kwargs,
        )
    return vig_pyg.create_model(
        "vig_ti_224_gelu",
        channels=cfg["n_filters"],
        blocks=cfg["n_blocks"],
        k=cfg["k"],
        conv=cfg["conv"],
        num_classes=cfg["n_classes"],
        **kwargs,
    )


def record_knn(model: torch.nn.Module) -> tuple[list, list]:
    """Hooks that keep each Grapher's neighbour indices as (B, N, k), local to each image's key nodes."""
    out, handles = [], []

    def hook(module: GridKNNGraph, args: tuple, graph: Graph) -> None:
        nodes, grid = args
        b = grid.batch_size
        keys = graph.sources if graph.sources is not None else nodes
        m = keys.size(0) // b
        assert graph.k == module.k
        nbr = graph.edge_index[0].view(b, nodes.size(0) // b, module.k)
        out.append(nbr - (torch.arange(b) * m).view(-1, 1, 1))

    for mod in model.modules():
        if isinstance(mod, GridKNNGraph):
            handles.append(mod.register_forward_hook(hook))
    return out, handles


@pytest.mark.parametrize("method", ["dense", "torch_cluster"])
@pytest.mark.parametrize("name", ALL)
def test_fixture_parity(name: str, method: str, two_threads) -> None:
    fx = load_fixture(name)
    cfg = fx["config"]
    model = model_for(cfg, knn_method=method).eval()
    model.load_state_dict(convert_official(official_state_dict(fx), model))

    knn, _ = record_knn(model)
    with torch.no_grad():
        final, feats = model.forward_intermediates(fx["input"])
        logits = model.forward_head(final)

    assert (logits - fx["logits"]).abs().max() <= 1e-4
    assert len(feats) == len(fx["stage_features"])
    for ours, ref in zip(feats, fx["stage_features"]):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() <= 1e-4
    assert len(knn) == len(fx["knn"]) == len(cfg["block_schedule"])
    for ours, (_, ref) in zip(knn, fx["knn"]):
        assert torch.equal(ours.sort(-1).values, ref.long().sort(-1).values)


def test_isotropic_stem_and_schedule() -> None:
    fx = load_fixture("vig_tiny_mr")
    model = model_for(fx["config"]).eval()
    model.load_state_dict(convert_official(official_state_dict(fx), model))
    with torch.no_grad():
        assert (model._embed(fx["input"]) - fx["stem_plus_pos_embed"]).abs().max() <= 1e-4
    sched = fx["config"]["block_schedule"]
    assert model.ks == [b["k"] for b in sched]
    assert model.dilations == [b["dilation"] for b in sched]


@pytest.mark.parametrize("name", PYRAMID[:1])
def test_pyramid_schedule(name: str) -> None:
    cfg = load_fixture(name)["config"]
    model = model_for(cfg)
    graphs = [m for m in model.modules() if isinstance(m, GridKNNGraph)]
    assert [(g.k, g.dilation, g.reduce_ratio) for g in graphs] == [
        (b["k"], b["dilation"], b["r"]) for b in cfg["block_schedule"]
    ]


@pytest.mark.parametrize("name", ALL)
def test_round_trip_to_official(name: str) -> None:
    """vig_pyg -> official -> vig_pyg is the identity, and the official form has the official keys."""
    fx = load_fixture(name)
    official = official_state_dict(fx)
    model = model_for(fx["config"])
    ours = convert_official(official, model)
    back = to_official(ours, model)
    assert list(back) == list(official) or set(back) == set(official)
    for key, value in official.items():
        assert back[key].shape == value.shape, key
        tol = 1e-6 if key.endswith("relative_pos") else 0.0
        assert (back[key].float() - value.float()).abs().max() <= tol, key
    again = convert_official(back, model)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
