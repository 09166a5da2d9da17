"""Generic checks over every registered model, and the numbers of the seven official variants."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from knn_margin import separated_input

import vig_pyg
from vig_pyg.models import IsotropicViG, PyramidViG

TEST_MODELS = ["vig_test", "pvig_test"]
# ViG's official variants (the successor families have their own tests: tests/test_successors.py).
OFFICIAL = [m for m in vig_pyg.list_models(include_test=False) if m.startswith(("vig_", "pvig_"))]
# Paper FLOPs (G multiply-accumulates, kNN distance matmul included).
PAPER_GMACS = {
    "vig_ti_224_gelu": 1.3,
    "vig_s_224_gelu": 4.5,
    "vig_b_224_gelu": 17.7,
    "pvig_ti_224_gelu": 1.7,
    "pvig_s_224_gelu": 4.6,
    "pvig_m_224_gelu": 8.9,
    "pvig_b_224_gelu": 16.8,
}


def make(name: str, **kwargs) -> torch.nn.Module:
    return vig_pyg.create_model(name, num_classes=kwargs.pop("num_classes", 7), **kwargs)


def images(b: int = 2, size: int | tuple[int, int] = 96) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(b, 3, h, w)


def test_registry() -> None:
    assert set(OFFICIAL) == set(PAPER_GMACS)
    assert vig_pyg.list_models("pvig_*", include_test=False) == [
        "pvig_b_224_gelu",
        "pvig_m_224_gelu",
        "pvig_s_224_gelu",
        "pvig_ti_224_gelu",
    ]
    mobilevig = [f"mobilevig_{v}" for v in ("ti", "s", "m", "b")]
    assert set(vig_pyg.list_models(pretrained=True)) == set(OFFICIAL) | set(mobilevig)


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_parameter_counts(name: str) -> None:
    keys = json.loads((FIXTURES / "official_keys.json").read_text())[name]
    with torch.device("meta"):
        model = vig_pyg.create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == keys["params_trainable"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_macs_match_paper(name: str) -> None:
    stats = vig_pyg.model_stats(vig_pyg.create_model(name))
    assert abs(stats["macs"] / 1e9 - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.02
    assert stats["params"] == sum(p.numel() for p in vig_pyg.create_model(name).parameters())


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_backward_every_parameter(name: str) -> None:
    model = make(name, drop_path_rate=0.1).train()
    out = model(images())
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing


@pytest.mark.parametrize("conv", ["edge", "gin", "sage", "gat", "gcn", "transformer"])
def test_any_conv(conv: str) -> None:
    model = make("pvig_test", conv=conv).train()
    out = model(images())
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_eval_deterministic_and_batch_independent(name: str) -> None:
    model = make(name).eval()
    x = separated_input(model, (3, 3, 96, 96))  # other batch, other GEMM rounding: no neighbour may swap
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    assert torch.allclose(a[1:2], single, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_head_contract(name: str) -> None:
    model = make(name).eval()
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model.get_classifier().out_features == 7
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
    with pytest.raises(ValueError):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name", TEST_MODELS)
def test_features_only_matches_feature_info(name: str) -> None:
    model = make(name)
    fx = vig_pyg.create_model(name, features_only=True)
    assert len(fx.feature_info) == (4 if isinstance(model, PyramidViG) else 3)
    feats = fx(images(2, 128))
    for f, info in zip(feats, fx.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == 128 // info["reduction"]
    if isinstance(model, PyramidViG):
        assert [i["reduction"] for i in fx.feature_info] == [4, 8, 16, 32]
    assert not any("head" in n for n, _ in fx.named_parameters())


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_intermediates(name: str) -> None:
    model = make(name).eval()
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(inter[-1], final)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last2, inter[-2:]))
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(nhwc[0], inter[0].permute(0, 2, 3, 1))
    with pytest.raises(ValueError):
        model.forward_intermediates(x, indices=[99])


@pytest.mark.parametrize("name", TEST_MODELS)
def test_grad_checkpointing_same_result(name: str) -> None:
    torch.manual_seed(0)
    model = make(name, drop_path_rate=0.2).train()
    x = images()
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), ref_grads))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_input_sizes(name: str) -> None:
    model = make(name).eval()
    smallest = model.min_input_size
    with torch.no_grad():
        assert model(images(1, smallest)).shape == (1, 7)
        assert model(images(2, (96, 160))).shape == (2, 7)
        assert model(images(1, 200)).shape == (1, 7)
    with pytest.raises(ValueError, match="too small"):
        model(images(1, smallest[0] - 1))


@pytest.mark.parametrize("size", [(160, 160), (224, 320), (448, 448)])
def test_official_variant_other_sizes(size: tuple[int, int]) -> None:
    model = vig_pyg.create_model("pvig_ti_224_gelu").eval()
    with torch.no_grad():
        assert model(images(1, size)).shape == (1, 1000)


def test_building_prints_nothing(capsys) -> None:
    vig_pyg.create_model("pvig_test")
    vig_pyg.create_model("vig_test")
    assert capsys.readouterr() == ("", "")


def test_bad_input() -> None:
    model = make("pvig_test").eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 96, 96))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 96, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        model(images(1, 32))
    with pytest.raises(ValueError, match="Did you mean 'pvig_s_224_gelu'"):
        vig_pyg.create_model("pvig_s_224")
    with pytest.raises(ValueError, match="unknown argument"):
        vig_pyg.create_model("pvig_test", chanels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match=r"needs 4 entries \(one per stage\)"):
        vig_pyg.create_model("pvig_test", channels=(8, 16))
    with pytest.raises(ValueError, match="channels must be a positive int"):
        vig_pyg.create_model("vig_test", channels=(8, 16))
    with pytest.raises(ValueError, match="unknown graph convolution"):
        vig_pyg.create_model("vig_test", conv="mrconv")


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("pvig_test", {"blocks": (0, 0, 0, 0)}, "blocks must be 4 positive ints"),
        ("pvig_test", {"blocks": (1, 1, 0, 1)}, "blocks must be 4 positive ints"),
        ("pvig_test", {"k": 0}, "k must be a positive int"),
        ("pvig_test", {"k": 2.5}, "k must be a positive int"),
        ("pvig_test", {"reduce_ratios": (0, 2, 1, 1)}, "reduce_ratios must be 4 positive ints"),
        ("pvig_test", {"img_size": 0}, "img_size must be a positive int"),
        ("pvig_test", {"img_size": (96, -1)}, r"img_size must be 2 positive ints \(height, width\)"),
        ("pvig_test", {"channels": (12, 24, 36, 0)}, "channels must be 4 positive ints"),
        ("vig_test", {"blocks": 0}, "blocks must be a positive int"),
        ("vig_test", {"k": -3}, "k must be a positive int"),
        ("vig_test", {"img_size": "96"}, "img_size must be 2 positive ints"),
    ],
)
def test_bad_configurations_are_refused(name: str, kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        vig_pyg.create_model(name, **kwargs)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_training_forward_with_one_image(name: str) -> None:
    """A batch of one trains (the head's BatchNorm normalises it with its running statistics)."""
    model = make(name).train()
    head_stats = model.head.norm.running_mean.clone()
    out = model(images(1, 96))
    out.square().mean().backward()
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.equal(model.head.norm.running_mean, head_stats)  # one sample updates no statistics
    trunk = model(images(2, 96))  # a larger batch trains the head's statistics as usual
    assert trunk.shape == (2, 7) and not torch.equal(model.head.norm.running_mean, head_stats)


def test_isotropic_schedule() -> None:
    with torch.device("meta"):
        ti = IsotropicViG(192, 12)
        s = IsotropicViG(320, 16)
        p = vig_pyg.create_model("pvig_m_224_gelu")
    assert ti.ks == [9, 9, 10, 11, 12, 13, 13, 14, 15, 16, 17, 18]
    assert ti.dilations == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert s.ks == [9, 9, 10, 10, 11, 12, 12, 13, 13, 14, 15, 15, 16, 16, 17, 18]
    assert s.dilations == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert p.dilations == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]
