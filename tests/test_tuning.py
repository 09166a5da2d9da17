"""The per-machine GEMM choice of the pointwise layers (vig_pyg.tuning)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from knn_margin import separated_input

import vig_pyg
from vig_pyg import tuning
from vig_pyg.layers.common import ConvNorm
from vig_pyg.tuning import GemmChoice, set_gemm

measure_gemm = tuning.measure_gemm  # the real one (conftest replaces it with a fixed tie in every test)


@pytest.fixture
def fresh_tuning(tmp_path, monkeypatch):
    """An empty tuning folder and no choices in memory."""
    monkeypatch.setenv("VIG_PYG_TUNING_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "measure_gemm", measure_gemm)
    return tmp_path


def _pointwise(model):
    return [m for m in model.modules() if isinstance(m, ConvNorm) and m.pointwise]


@pytest.mark.parametrize("name", ["pvig_test", "vig_test"])
def test_both_kernels_compute_the_same_model(name: str) -> None:
    """linear and conv give the same outputs and gradients (float rounding apart), eval and training."""
    linear = vig_pyg.create_model(name, gemm="linear").to(memory_format=torch.channels_last)
    conv = set_gemm(copy.deepcopy(linear), "conv")
    assert {str(m.gemm) for m in _pointwise(conv)} == {"conv"}
    x = separated_input(linear.eval(), (2, 3, *linear.img_size))
    with torch.no_grad():
        torch.testing.assert_close(conv.eval()(x), linear(x), rtol=1e-4, atol=1e-4)
    for model in (linear, conv):
        model.train()
        model(x).square().sum().backward()
    # A conv bias that feeds a training-mode BatchNorm has a zero gradient in exact arithmetic (the
    # norm subtracts the batch mean): both kernels give rounding noise there, compared with zero.
    # Compared with zero, on the scale of the same layer's weight gradient.
    before_norm = {
        f"{n}.conv.bias": m.conv.weight.grad.abs().max().item()
        for n, m in linear.named_modules()
        if isinstance(m, ConvNorm)
    }
    for (key, p), q in zip(linear.named_parameters(), conv.parameters()):
        if key in before_norm:
            assert max(p.grad.abs().max(), q.grad.abs().max()) < 1e-4 * before_norm[key], key
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=key)
    for (key, b), c in zip(linear.named_buffers(), conv.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=key)


def test_auto_measures_once_per_machine_and_keeps_the_random_state(fresh_tuning, monkeypatch) -> None:
    torch.manual_seed(3)
    model = vig_pyg.create_model("pvig_test")  # gemm="auto" is the default
    after_auto = torch.randn(4)
    torch.manual_seed(3)
    vig_pyg.create_model("pvig_test", gemm="linear")
    torch.testing.assert_close(after_auto, torch.randn(4))  # measuring drew no global random numbers

    stored = json.loads(tuning.tuning_file().read_text())
    assert stored["cpu"] == tuning.cpu_model() and stored["threads"] == torch.get_num_threads()
    # One entry per distinct layer shape, at the nominal batch: pvig_test's first stage is 24x24 nodes.
    assert f"{8 * 24 * 24}x12x48" in stored["choices"]
    assert all(set(v) <= set(tuning.GEMMS) for v in stored["choices"].values())
    chosen = {str(m.gemm) for m in _pointwise(model)}
    assert chosen and all(isinstance(m.gemm, GemmChoice) for m in _pointwise(model))
    assert "gemm=" in repr(model)

    # A new process (nothing in memory) reads the file instead of measuring again.
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "measure_gemm", lambda *a: pytest.fail("measured again"))
    again = vig_pyg.create_model("pvig_test")
    assert [m.gemm for m in _pointwise(again)] == [m.gemm for m in _pointwise(model)]


def test_an_unreadable_tuning_file_is_measured_again(fresh_tuning) -> None:
    path = tuning.tuning_file()
    path.write_text("{not json")
    choice = tuning.best_gemm(64, 8, 16)
    assert choice.eval in tuning.GEMMS and choice.train in tuning.GEMMS
    assert json.loads(path.read_text())["choices"]["64x8x16"] == list(choice)


def test_the_choice_picks_the_faster_kernel(fresh_tuning, monkeypatch) -> None:
    times = {"linear": (1.0, 5.0), "conv": (2.0, 4.0)}  # linear faster forward, conv faster in training
    monkeypatch.setattr(tuning, "measure_gemm", lambda *a: times)
    assert tuning.best_gemm(10, 4, 4) == GemmChoice("linear", "conv")
    times = {"linear": (1.0, 1.0), "conv": (1.01, 1.01)}  # a near tie keeps the convolution
    assert tuning.best_gemm(11, 4, 4) == GemmChoice("conv", "conv")


def test_bad_gemm_names_are_refused() -> None:
    with pytest.raises(ValueError, match="gemm must be"):
        vig_pyg.create_model("vig_test", gemm="mkl")


def test_a_meta_device_build_keeps_the_default_kernels() -> None:
    with torch.device("meta"):
        model = vig_pyg.create_model("pvig_test")
    assert {m.gemm for m in _pointwise(model)} == {GemmChoice()}
