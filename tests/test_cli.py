"""``vig-pyg`` / ``python -m vig_pyg``: every subcommand, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import make_folder

import vig_pyg
from vig_pyg.cli import main
from vig_pyg.models import to_official
from vig_pyg.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--img-size", "33", "--k", "4", "--batch-size", "32", "--limit-train", "64", "--limit-val", "32"]


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() points the vig_pyg logger at the (captured) stderr of the test; undo that afterwards.
    logger = logging.getLogger("vig_pyg")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained run on the digits, an official-layout file, a truncated checkpoint, an image folder."""
    root = tmp_path_factory.mktemp("cli")
    train(
        TrainConfig(
            out_dir=str(root / "run"), model_kwargs={"img_size": 33, "k": 4}, epochs=1, batch_size=32,
            limit_train=64, limit_val=32,
        )
    )  # fmt: skip
    model = vig_pyg.create_model("pvig_test", num_classes=10, img_size=33, k=4)
    torch.save(to_official(model.state_dict(), model), root / "official.pth")
    data = (root / "run" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    return {
        "run": root / "run",
        "official": root / "official.pth",
        "truncated": root / "truncated.pt",
        "data": make_folder(root / "data"),
        "root": root,
    }


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_prints_counts_and_a_block_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "info", "pvig_test", "--img-size", "33", "--k", "4", "--conv", "edge")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("pvig_test: ") and "MACs at 3x33x33" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    rows = [line.split() for line in lines[header + 2 :]]
    assert len(rows) == 5
    assert rows[0][:3] == ["0", "0", "12"] and rows[0][3] == "9x9=81" and rows[0][7] == "EdgeConv"
    assert [r[5] for r in rows] == ["4", "2", "1", "1", "1"]  # reduce ratios
    assert [r[6] for r in rows] == ["4"] * 5  # edges per node: k
    assert rows[0][8:] == ["knn", "k=4", "dilation=1", "relative_pos"]


def test_train_then_eval_visualize_convert(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "--out", out_dir, "--epochs", "1", *TINY_ARGS)
    assert rc == 0, err
    assert re.fullmatch(r"best val top-1: \d+\.\d%", out.splitlines()[-1])
    assert "epoch 1/1" in err and (out_dir / "best.pt").is_file()

    rc, out, _ = run_cli(capsys, "eval", out_dir / "best.pt", "--json")
    metrics = json.loads(out)
    assert rc == 0 and metrics["count"] == 359 and metrics["model"] == "pvig_test"  # the whole val split
    assert metrics["preprocessing"]["mean"] == [0.5, 0.5, 0.5]

    rc, out, _ = run_cli(capsys, "visualize", out_dir / "best.pt", "--patch", "0.3,0.6", "--index", "3")
    assert rc == 0 and out.strip() == f"graph picture: {out_dir / 'graph.png'}"
    with Image.open(out_dir / "graph.png") as pic:
        assert pic.format == "PNG" and pic.width > 4 * 320

    rc, out, err = run_cli(capsys, "train", "--out", out_dir, "--epochs", "1", *TINY_ARGS)
    assert rc == 2 and "--resume" in err  # the finished run is not overwritten


def test_convert_and_eval_official_weights(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "w.safetensors"
    rc, out, err = run_cli(
        capsys, "convert", files["official"], dest, "--model", "pvig_test", "--img-size", "33", "--k", "4"
    )
    assert rc == 0, err
    assert "loads back strictly" in out and dest.is_file()
    for weights in (files["official"], dest):
        rc, out, _ = run_cli(
            capsys,
            "eval",
            weights,
            "--model",
            "pvig_test",
            "--img-size",
            "33",
            "--k",
            "4",
            "--data",
            files["data"],
        )
        assert rc == 0 and "top-1" in out and "(4 images)" in out


def _broken_folder(root: Path, kind: str) -> Path:
    data = make_folder(root / kind)
    if kind == "corrupt":
        (data / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif kind == "empty_val_class":
        for f in (data / "val" / "cat").iterdir():
            f.unlink()
    elif kind == "no_images":
        for f in data.rglob("*.*"):
            f.unlink()
    return data


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_data", "does not exist"),
        ("empty_data", "has no train/ folder"),
        ("no_images", "has no images"),
        ("corrupt", "is not a readable image"),
        ("empty_val_class", "hold no images"),
        ("truncated", "truncated"),
        ("other_model", "holds a pvig_test model, not vig_test"),
        ("official_wrong_model", "does not fit vig_test"),
        ("bare_without_model", "pass --model NAME"),
        ("resume_truncated", "truncated"),
        ("visualize_nothing", "give a checkpoint"),
        ("too_small", "too small"),
        ("k_zero", "k must be a positive int, got 0"),
        ("img_size_zero", "img_size must be a positive int"),
        ("workers_negative", "workers must be an integer >= 0"),
        ("clip_grad_negative", "clip grad must be a positive gradient norm"),
        ("eval_batch_zero", "batch size must be an integer >= 1"),
        ("rank_not_a_number", "RANK='abc' is not a number"),
        ("rank_without_torchrun", "RANK=1 is set but WORLD_SIZE is not"),
        ("handmade_checkpoint", "lacks the entries 'model_name'"),
        ("folder_as_checkpoint", "is a folder, not a checkpoint file"),
        ("corrupt_checkpoint", "is corrupt"),
        ("out_under_a_file", "cannot use"),
        ("visualize_out_under_a_file", "is a file, not a folder"),
        ("convert_dest_under_a_file", "is a file, not a folder"),
    ],
)
def test_errors_are_one_line_with_status_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, Path],
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    out_dir = tmp_path / "out"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv: list = {
        "missing_data": ["train", "--data", tmp_path / "nope", "--out", out_dir],
        "truncated": ["eval", files["truncated"]],
        "other_model": ["eval", files["run"] / "best.pt", "--model", "vig_test"],
        "official_wrong_model": ["eval", files["official"], "--model", "vig_test"],
        "bare_without_model": ["eval", files["official"]],
        "visualize_nothing": ["visualize"],
        "too_small": ["train", "--out", out_dir, "--img-size", "20"],
        "k_zero": ["train", "--out", out_dir, "--k", "0"],
        "img_size_zero": ["train", "--out", out_dir, "--img-size", "0"],
        "workers_negative": ["train", "--out", out_dir, "--workers", "-1"],
        "clip_grad_negative": ["train", "--out", out_dir, "--clip-grad", "-1"],
        "eval_batch_zero": ["eval", files["run"] / "best.pt", "--batch-size", "0"],
        "rank_not_a_number": ["train", "--out", out_dir],
        "rank_without_torchrun": ["train", "--out", out_dir],
        "folder_as_checkpoint": ["eval", files["run"]],
        "out_under_a_file": ["train", "--out", a_file / "run", *TINY_ARGS],
        "visualize_out_under_a_file": ["visualize", files["run"] / "best.pt", "--out", a_file / "g.png"],
        "convert_dest_under_a_file": ["convert", files["official"], a_file / "w.safetensors", "--model",
                                      "pvig_test", "--img-size", "33", "--k", "4"],
    }.get(case, [])  # fmt: skip
    if case == "rank_not_a_number":
        monkeypatch.setenv("RANK", "abc")
    elif case == "rank_without_torchrun":
        monkeypatch.setenv("RANK", "1")
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    elif case == "handmade_checkpoint":
        torch.save({"format": "vig_pyg-train-1", "model": {}}, tmp_path / "hand.pt")
        argv = ["eval", tmp_path / "hand.pt"]
    elif case == "corrupt_checkpoint":
        ckpt = torch.load(files["run"] / "best.pt", weights_only=True)
        key = next(iter(ckpt["model"]))
        ckpt["model"][key] = ckpt["model"][key] + 1  # contents changed behind the checksum's back
        torch.save(ckpt, tmp_path / "corrupt.pt")
        argv = ["eval", tmp_path / "corrupt.pt"]
    if case == "empty_data":
        (tmp_path / "empty").mkdir()
        argv = ["train", "--data", tmp_path / "empty", "--out", out_dir]
    elif case in ("no_images", "corrupt", "empty_val_class"):
        argv = ["train", "--data", _broken_folder(tmp_path, case), "--out", out_dir]
    elif case == "resume_truncated":
        out_dir.mkdir()
        (out_dir / "last.pt").write_bytes(files["truncated"].read_bytes())
        argv = ["train", "--out", out_dir, "--resume"]
    before = sorted(out_dir.iterdir()) if out_dir.exists() else None
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vig-pyg {argv[0]}: error: ") and expected in lines[0]
    assert "Traceback" not in err and out == ""
    # Nothing was written: the run directory is as it was (absent, or with the same files).
    assert (sorted(out_dir.iterdir()) if out_dir.exists() else None) == before


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vig_pyg",
            "train",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("vig-pyg train: error: data folder")
        and "\n" not in proc.stderr.strip()
    )
    assert not (tmp_path / "o").exists()


def test_kernels_reports_and_builds(capsys: pytest.CaptureFixture[str]) -> None:
    from vig_pyg import kernels

    assert main(["kernels"]) == 0
    state = capsys.readouterr().out
    assert ("loaded" in state) == kernels.available()
    if kernels.available():  # already built: --build only loads it
        assert main(["kernels", "--build"]) == 0
        assert "ready" in capsys.readouterr().out
