"""Eval-path optimisations against the plain computations they replace."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vig_pyg.nn import aggr
from vig_pyg.nn.aggr import _first_argmax, neighbor_max
from vig_pyg.nn.mlp import activate


def test_blocked_neighbor_max_equals_one_gather(monkeypatch) -> None:
    monkeypatch.setattr(aggr, "_BLOCK_ELEMENTS", 64)  # many blocks, with a ragged last one
    x = torch.randint(-3, 3, (50, 7)).float()  # ties between neighbours
    index = torch.randint(0, 50, (41 * 5,))
    best, pos = neighbor_max(x, index, 5, positions=True)
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
