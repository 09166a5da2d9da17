"""Eval-path optimisations against the plain computations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vig_pyg.layers.common import ConvNorm
from vig_pyg.nn.mlp import GroupedMLP, activate, fold_pays
from vig_pyg.ops import aggregate
from vig_pyg.ops.aggregate import _first_argmax, blocked_neighbor_max


def test_blocked_neighbor_max_equals_one_gather(monkeypatch) -> None:
    monkeypatch.setattr(aggregate, "_BLOCK_ELEMENTS", 64)  # many blocks, with a ragged last one
    monkeypatch.setattr(aggregate, "_WHOLE_MAX_ELEMENTS", 0)
    x = torch.randint(-3, 3, (50, 7)).float()  # ties between neighbours
    index = torch.randint(0, 50, (41 * 5,))
    best, pos = blocked_neighbor_max(x, index, 5, True)  # the PyTorch CPU kernel, in blocks
    gathered = x.index_select(0, index).view(41, 5, 7)
    assert torch.equal(best, gathered.amax(1))
    assert torch.equal(pos, _first_argmax(gathered, gathered.amax(1)))
    assert torch.equal(pos.long(), gathered.max(1).indices)  # the first winner, as torch.max picks


def test_gelu_on_channels_last_maps_equals_the_contiguous_result() -> None:
    act = nn.GELU()
    x = torch.randn(2, 16, 7, 9) * 4
    ref = F.gelu(x)
    for inplace in (True, False):
        y = x.contiguous(memory_format=torch.channels_last).requires_grad_(not inplace)
        out = activate(act, y if not inplace else y.clone())
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _randomise(norm: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()


@pytest.mark.parametrize(("kernel", "stride"), [(1, 1), (3, 2), (3, 1)])
@pytest.mark.parametrize("batch", [1, 64])
def test_conv_norm_eval_equals_the_plain_layers(kernel: int, stride: int, batch: int) -> None:
    layer = ConvNorm(24, 32, kernel, stride).eval()
    _randomise(layer.norm)
    x = torch.randn(batch, 24, 6, 6).contiguous(memory_format=torch.channels_last)
    side = (6 + 2 * (kernel // 2) - kernel) // stride + 1
    assert layer._output_elements(x) == batch * side * side * 32
    # batch 1: weights (24 * 32 * k * k) outnumber outputs for the 3x3 convs, so the output is normalised
    assert fold_pays(layer.conv.weight, layer._output_elements(x)) == (batch == 64 or kernel == 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.norm(layer.conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 400])
def test_grouped_mlp_eval_equals_the_plain_layers(rows: int) -> None:
    mlp = GroupedMLP(64, 64, groups=4).eval()
    _randomise(mlp.norm)
    x = torch.randn(rows, 64)
    assert fold_pays(mlp.lin.weight, rows * 64) == (rows == 400)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.act(mlp.norm(mlp.lin(x))), rtol=1e-5, atol=1e-5)
