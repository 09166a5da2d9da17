from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vig_pyg import tuning

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS))  # dense_reference, the un-optimised oracle


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size check: run `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def two_threads():
    """The fixtures were made with 2 threads; 1 thread moves float results by ~1e-6."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it (torch, numpy, random)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fixed_gemm(monkeypatch, tmp_path_factory):
    """Models built with ``gemm="auto"`` take one kernel everywhere (a measured tie keeps the
    convolution): a real measurement could choose differently from run to run. Nothing is written to
    the user's cache; tests/test_tuning.py measures for real."""
    monkeypatch.setenv("VIG_PYG_TUNING_DIR", str(tmp_path_factory.getbasetemp() / "tuning"))
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "measure_gemm", lambda *shape: {"linear": (1.0, 1.0), "conv": (1.0, 1.0)})
