"""Smoke tests of the scripts in examples/: each runs in its ``--quick`` mode and prints what it promises."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"vig_pyg_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered like an imported module: torch.compile looks classes defined there up by module name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # --quick sets one thread (a shared CPU); give the rest of the suite its setting back.
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_inference(capsys: pytest.CaptureFixture[str]) -> None:
    load("inference").main(["--quick", "--images", "3"])
    out = capsys.readouterr().out
    assert "mean=(0.5, 0.5, 0.5)" in out and "bicubic" in out
    assert "reloaded model matches the saved one: True" in out
    rows = re.findall(r"^  image \d \(label \d\): (.*)$", out, flags=re.M)
    assert len(rows) == 3
    for row in rows:
        probs = [float(p) for p in re.findall(r"\d:(\d\.\d+)", row)]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)


def test_inference_writes_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "w.safetensors"
    load("inference").main(["--quick", "--images", "1", "--out", str(out_file)])
    assert out_file.stat().st_size > 0
    assert "matches the saved one: True" in capsys.readouterr().out


def test_swap_conv(capsys: pytest.CaptureFixture[str]) -> None:
    rows = load("swap_conv").main(["--quick"])
    out = capsys.readouterr().out
    printed = re.findall(r"^(\w+)\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+)$", out, flags=re.M)
    assert [r[0] for r in printed] == ["mr", "edge", "gin", "sage", "gat", "gcn"]
    assert len(rows) == 6
    for _, params, top1, _ in rows:
        assert params > 0 and 0.0 <= top1 <= 100.0


def test_custom_graph(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = load("custom_graph").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "reloaded: first block's graph RowKNNGraph()" in out
    assert math.isfinite(result["compile_gap"]) and (tmp_path / "row_graph.png").is_file()
    from vig_pyg.graph.builders import _REGISTRY

    _REGISTRY.pop("row_knn", None)  # the example registers its builder at import


def test_sparse_graphs(capsys: pytest.CaptureFixture[str]) -> None:
    load("sparse_graphs").main(["--quick"])
    out = capsys.readouterr().out
    assert "kNN back-ends agree (dense vs torch_cluster): True" in out
    assert "k-regular fast path == PyG aggregation: True" in out
    assert out.count("cross-image edges: 0") == 2
    ragged = re.search(r"nodes per graph: \[(\d+), (\d+), (\d+)\] \(of", out)
    assert ragged is not None and len(set(ragged.groups())) > 1  # different patches kept per image
    assert "back to images: [(32, 10, 10), (32, 12, 16), (32, 7, 9)]" in out


def test_multiscale_features(capsys: pytest.CaptureFixture[str]) -> None:
    load("multiscale_features").main(["--quick"])
    out = capsys.readouterr().out
    # Every level's measured stride equals its declared reduction, at both input sizes.
    levels = re.findall(r"reduction\s+(\d+)\s+stride\s+(\d+)", out)
    assert len(levels) == 8 and all(r == s for r, s in levels)
    assert "shape (1, 48, 3, 4)" in out  # the non-square 96x128 input's last stage
    assert out.count("shape (1, 48, 6, 6)") == 4  # three isotropic blocks and the final features
