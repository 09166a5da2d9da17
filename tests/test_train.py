"""Training: exact resume, checkpoints, run directories, evaluation, conversion, DDP on CPU."""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import make_folder

import vig_pyg
from vig_pyg.errors import CheckpointError, DataError, RunDirError, UsageError
from vig_pyg.models import to_official
from vig_pyg.train import (
    TrainConfig,
    WarmupCosine,
    capture_rng_state,
    convert_checkpoint,
    evaluate_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng_state,
    train,
)

REPO = Path(__file__).resolve().parents[1]
# The smallest useful run: pvig_test at 33x33 (its minimum with k=4), 3 steps of 32 digits per epoch.
TINY = dict(
    model="pvig_test", model_kwargs={"img_size": 33, "k": 4}, batch_size=32, limit_train=96, limit_val=48
)


def tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out), **{**TINY, "epochs": 2, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run on the digits (shared by the read-only tests)."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(tiny(out))
    return out


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # Drop path and the digits' random affine both draw from the RNGs that the checkpoint carries.
    straight = train(tiny(tmp_path / "a", drop_path=0.1))
    first = train(tiny(tmp_path / "b", drop_path=0.1, stop_after=1))
    assert first.epochs_done == 1 and not (tmp_path / "b" / "metrics.csv").read_text().count("\n2,")
    torch.manual_seed(123)  # whatever happens between the two invocations must not matter
    random.seed(5)
    resumed = train(tiny(tmp_path / "b", drop_path=0.1, resume=True))
    assert resumed.epochs_done == 2
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    for ra, rb in zip(straight.history, resumed.history):
        assert {k: v for k, v in ra.items() if k != "epoch_time_s"} == {
            k: v for k, v in rb.items() if k != "epoch_time_s"
        }
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_checkpoint_is_self_describing_and_weights_only(run: Path) -> None:
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_name"] == "pvig_test" and ckpt["epoch"] == 2
    assert ckpt["model_kwargs"] == {"img_size": 33, "k": 4, "drop_path_rate": 0.0}
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert ckpt["preprocessing"] == {
        "input_size": [3, 33, 33],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 1.0,
        "interpolation": "bicubic",
    }
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.csv",
        "metrics.jsonl",
    ]  # no temporary files left behind
    model, info = load_model(run / "best.pt")
    assert info.epoch == ckpt["best_epoch"] and info.preprocessing.size == (33, 33)
    assert model(torch.randn(2, 3, 33, 33)).shape == (2, 10)


def test_evaluate_checkpoint_reproduces_the_recorded_score(run: Path) -> None:
    ckpt = load_checkpoint(run / "best.pt")
    metrics = evaluate_checkpoint(run / "best.pt", limit=48)
    assert metrics["count"] == 48
    assert metrics["val_top1"] == pytest.approx(ckpt["best_top1"])
    assert metrics["val_top5"] >= metrics["val_top1"]


def test_existing_run_dir_is_not_touched(run: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunDirError, match="--resume to continue"):
        train(tiny(run))
    # A failing run with --overwrite (bad data) loses nothing either.
    with pytest.raises(DataError):
        train(tiny(run, overwrite=True, data=str(tmp_path / "nope")))
    with pytest.raises(RunDirError, match="keeps its settings"):
        train(tiny(run, resume=True, model="vig_test"))
    with pytest.raises(RunDirError, match="more than --epochs"):
        train(tiny(run, resume=True, epochs=1))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_bad_data_fails_before_the_run_dir_exists(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    (data / "val" / "cat" / "0.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"0\.jpg is not a readable image"):
        train(tiny(tmp_path / "out", data=str(data)))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="too small"):
        train(tiny(tmp_path / "out", model_kwargs={"img_size": 24, "k": 4}))
    with pytest.raises(UsageError, match="unknown model"):
        train(tiny(tmp_path / "out", model="pvig_nope"))
    assert not (tmp_path / "out").exists()


def test_resume_needs_an_intact_last_checkpoint(run: Path, tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(tiny(tmp_path / "empty", resume=True))
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (run / "last.pt").read_bytes()
    (broken / "last.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated") as info:
        train(tiny(broken, resume=True))
    assert "\n" not in str(info.value)


def test_folder_training_and_evaluation(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n_train=4, n_val=2, size=(45, 37))
    result = train(tiny(tmp_path / "out", data=str(data), epochs=1, batch_size=4, workers=0))
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["class_names"] == ["cat", "dog"]
    assert ckpt["preprocessing"]["crop_pct"] == 0.9 and ckpt["preprocessing"]["input_size"] == [3, 33, 33]
    metrics = evaluate_checkpoint(result.last_checkpoint, data=str(data))
    assert metrics["count"] == 4 and metrics["val_top1"] == pytest.approx(result.last_top1)
    with pytest.raises(UsageError, match="not trained on the digits"):
        evaluate_checkpoint(result.last_checkpoint)


def test_official_weights_convert_and_evaluate(tmp_path: Path) -> None:
    kwargs = {"img_size": 33, "k": 4}
    model = vig_pyg.create_model("pvig_test", num_classes=10, **kwargs)
    torch.save({"state_dict": to_official(model.state_dict(), model)}, tmp_path / "official.pth")
    info = convert_checkpoint(
        tmp_path / "official.pth", tmp_path / "w.safetensors", "pvig_test", model_kwargs=kwargs
    )
    assert info["num_classes"] == 10
    back, ckinfo = load_model(tmp_path / "w.safetensors", "pvig_test", kwargs)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert ckinfo.class_names is None and ckinfo.preprocessing.mean == (0.5, 0.5, 0.5)
    with pytest.raises(UsageError, match="already exists"):
        convert_checkpoint(
            tmp_path / "official.pth", tmp_path / "w.safetensors", "pvig_test", model_kwargs=kwargs
        )
    with pytest.raises(CheckpointError, match="does not fit vig_test"):
        load_model(tmp_path / "official.pth", "vig_test")
    with pytest.raises(UsageError, match="--model NAME"):
        load_model(tmp_path / "official.pth")


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1)
    lrs = [sched.lr_at(i) for i in range(11)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:])) and lrs[10] == pytest.approx(0.1)
    for _ in range(4):
        sched.step()
    again = WarmupCosine(opt, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1)
    again.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[4])


def test_rng_state_round_trip(tmp_path: Path) -> None:
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_cpu_with_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "vig_pyg", "train", "--out", str(out), "--img-size", "33", "--k", "4", "--epochs", "1",
        "--batch-size", "16", "--limit-train", "64", "--limit-val", "30", "--workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val top-1:") == 1  # rank 0 only
    assert proc.stderr.count("epoch 1/1") == 1
    assert "2 process(es)" in proc.stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # The 30 validation images are split exactly between the ranks (no padding): counts are whole images.
    assert round(ckpt["metrics"]["val_top1"] * 30 / 100, 6) == round(ckpt["metrics"]["val_top1"] * 30 / 100)
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.csv",
        "metrics.jsonl",
    ]


def test_sync_bn_in_one_process_is_a_no_op(tmp_path: Path) -> None:
    assert train(tiny(tmp_path / "o", epochs=1, sync_bn=True)).epochs_done == 1
