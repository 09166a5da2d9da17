"""The run folder survives faults: a kill at any write, leftovers, two runs at once, flipped bits, signals."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_data import make_folder

import vig_pyg
import vig_pyg.files
import vig_pyg.train.loop
from vig_pyg.errors import CheckpointError, DataError, OutputError, RunDirError
from vig_pyg.models import load_pretrained, save_pretrained
from vig_pyg.train import TrainConfig, load_checkpoint, load_model, train
from vig_pyg.train.rundir import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
# Two steps of 32 digits per epoch at pvig_test's smallest input with k=4.
TINY = dict(
    model="pvig_test", model_kwargs={"img_size": 33, "k": 4}, batch_size=32, limit_train=64, limit_val=32
)
# Scripted validation scores per epoch (the real evaluation runs, its scores are replaced): epoch 2 is
# not a new best, so every kind of commit (with and without best.pt) happens.
SCORES = [50.0, 40.0, 60.0]


class Kill(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it on the way out."""


def tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out), **{**TINY, "epochs": 3, **kw})


@pytest.fixture
def scripted_scores(monkeypatch: pytest.MonkeyPatch):
    """Validation top-1 of epoch e (0-based) is SCORES[e]; the epoch is read from the sampler."""
    epoch = {"now": 0}

    class Sampler(torch.utils.data.DistributedSampler):
        def set_epoch(self, e: int) -> None:
            epoch["now"] = e
            super().set_epoch(e)

    real = vig_pyg.train.loop.evaluate

    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return {**metrics, "val_top1": SCORES[epoch["now"]], "val_loss": 1.0 + epoch["now"]}

    monkeypatch.setattr(vig_pyg.train.loop, "DistributedSampler", Sampler)
    monkeypatch.setattr(vig_pyg.train.loop, "evaluate", evaluate)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


def _jsonl(path: Path) -> list[dict]:
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {path}")) for line in open(path)]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same run: files, weights, best epoch, metrics (times aside)."""
    names = sorted(p.name for p in a.iterdir())
    assert (
        names
        == sorted(p.name for p in b.iterdir())
        == [
            "best.pt",
            "config.json",
            "last.pt",
            "metrics.csv",
            "metrics.jsonl",
        ]
    )
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["epoch"] == cb["epoch"] and ca["best_epoch"] == cb["best_epoch"], name
        assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]), name
    assert _rows(a / "metrics.csv") == _rows(b / "metrics.csv")
    assert _jsonl(a / "metrics.jsonl") == _jsonl(b / "metrics.jsonl")


def test_a_kill_at_any_write_is_repaired_by_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted_scores
) -> None:
    """Every file a run writes, one at a time: the process 'dies' just before that file is renamed into
    place, leaving its temporary file behind; ``--resume`` then ends with the uninterrupted run's folder."""
    reference = tmp_path / "reference"
    real_replace = vig_pyg.files.replace_file
    writes: list[str] = []

    def recording(tmp: Path, path: Path) -> None:
        writes.append(path.name)
        real_replace(tmp, path)

    monkeypatch.setattr(vig_pyg.files, "replace_file", recording)
    train(tiny(reference))
    # epoch 1: last, best, metrics, config; epoch 2 (no new best): last, metrics; epoch 3: last, best, metrics
    assert writes == [
        *("last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.json"),
        *("last.pt", "metrics.csv", "metrics.jsonl"),
        *("last.pt", "best.pt", "metrics.csv", "metrics.jsonl"),
    ]
    assert load_checkpoint(reference / "best.pt")["epoch"] == 3

    for point in range(len(writes)):
        out = tmp_path / f"killed-at-{point}"
        calls = {"n": 0}

        def dying(tmp: Path, path: Path, point: int = point, calls: dict = calls) -> None:
            if calls["n"] == point:
                # What a kill leaves: the half-written temporary file, under the dead process's pid.
                shutil.copy(tmp, path.with_name(f".{path.name}.999999.tmp"))
                raise Kill
            calls["n"] += 1
            real_replace(tmp, path)

        monkeypatch.setattr(vig_pyg.files, "replace_file", dying)
        with pytest.raises(Kill):
            train(tiny(out))
        monkeypatch.setattr(vig_pyg.files, "replace_file", real_replace)
        assert any(p.name.endswith(".999999.tmp") for p in out.iterdir())
        train(tiny(out, resume=True))
        assert_same_run(out, reference)


def test_leftovers_of_a_killed_first_epoch_do_not_block_the_folder(tmp_path: Path) -> None:
    for resume in (False, True):
        out = tmp_path / f"resume-{resume}"
        out.mkdir()
        (out / ".last.pt.999999.tmp").write_bytes(b"")  # a kill while the first last.pt was written
        (out / LOCK_NAME).write_text("pid 999999 on elsewhere, started long ago: vig-pyg train\n")
        result = train(tiny(out, epochs=1, resume=resume))
        assert result.epochs_done == 1
        assert sorted(p.name for p in out.iterdir()) == [
            "best.pt",
            "config.json",
            "last.pt",
            "metrics.csv",
            "metrics.jsonl",
        ]


def test_a_stale_best_checkpoint_is_restored_on_resume(tmp_path: Path, scripted_scores) -> None:
    out = tmp_path / "run"
    train(tiny(out, stop_after=1))
    (out / "best.pt").unlink()  # as after a kill between last.pt and best.pt of epoch 1
    (out / "metrics.csv").write_text("epoch\n")  # and before its metrics row
    train(tiny(out, resume=True, stop_after=1))
    assert load_checkpoint(out / "best.pt")["epoch"] == 1  # restored from last.pt of epoch 1 first
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["1", "2"]


def test_overwrite_drops_the_replaced_runs_best_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(tiny(out, epochs=1))
    old_best = load_checkpoint(out / "best.pt")
    # A new run whose first epoch never scores (non-finite validation loss) must not leave the old best.
    real = vig_pyg.train.loop.evaluate
    monkeypatch.setattr(
        vig_pyg.train.loop, "evaluate", lambda *a, **k: {**real(*a, **k), "val_loss": math.nan}
    )
    train(tiny(out, epochs=1, overwrite=True))
    assert old_best["run_id"] != load_checkpoint(out / "last.pt")["run_id"]
    assert not (out / "best.pt").exists()
    rows = _jsonl(out / "metrics.jsonl")  # valid JSON: a NaN loss is written as null
    assert rows[0]["val_loss"] is None and rows[0]["best_val_top1"] is None


def test_nan_validation_loss_is_never_the_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = vig_pyg.train.loop.evaluate
    losses = iter([1.0, math.nan, 2.0])

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "val_top1": 90.0, "val_loss": next(losses)}

    monkeypatch.setattr(vig_pyg.train.loop, "evaluate", evaluate)
    out = tmp_path / "run"
    result = train(tiny(out))
    assert result.best_epoch == 1 and load_checkpoint(out / "best.pt")["epoch"] == 1
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and _jsonl(out / "metrics.jsonl")[1]["val_loss"] is None


def test_a_full_disk_stops_the_run_with_earlier_epochs_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def filling(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2's last.pt (epoch 1 wrote last.pt and best.pt)
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling)
    with pytest.raises(OutputError, match="No space left on device") as info:
        train(tiny(out))
    assert "earlier epochs are intact" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not any(vig_pyg.files.is_temporary(p.name) for p in out.iterdir())
    assert train(tiny(out, resume=True)).epochs_done == 3


# -- locking --------------------------------------------------------------------------------------------
def test_a_folder_in_use_is_refused_with_its_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(out / LOCK_NAME)!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid 4242 on somewhere, started now: vig-pyg train'); f.flush()\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=r"in use by another training run.*pid 4242"):
            train(tiny(out, epochs=1))
        with pytest.raises(RunDirError, match="in use"):
            train(tiny(out, epochs=1, overwrite=True))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny(out, epochs=1)).epochs_done == 1  # the holder's death released the lock
    assert not (out / LOCK_NAME).exists()


def _start_cli_run(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "vig_pyg", "train", "--out", str(out), "--img-size", "33", "--k", "4",
        "--batch-size", "32", "--limit-train", "64", "--limit-val", "32", "--workers", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(stream, needle: str, timeout: float = 120) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    pytest.fail(f"no line with {needle!r} in: {''.join(seen)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_two_runs_on_one_folder_and_a_stop_signal(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "run"
    first = _start_cli_run(out, "--epochs", "10000")
    try:
        _wait_for_line(first.stderr, "epoch 1/10000")
        holder = (out / LOCK_NAME).read_text()
        assert f"pid {first.pid} " in holder
        second = _start_cli_run(out, "--epochs", "1", "--overwrite")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.strip().count("\n") == 0 and "in use by another training run" in err
        assert f"pid {first.pid}" in err
        first.send_signal(signum)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 128 + signum, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"vig-pyg train: stopped by {signal.Signals(signum).name}; continue with")
    assert "--resume" in last_line and "Traceback" not in err
    done = load_checkpoint(out / "last.pt")["epoch"]
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == list(range(1, done + 1))
    assert not (out / LOCK_NAME).exists() and not any(
        vig_pyg.files.is_temporary(p.name) for p in out.iterdir()
    )
    result = train(tiny(out, epochs=10000, resume=True, stop_after=1))
    assert result.epochs_done == done + 1


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_torchrun_worker_death_stops_the_others_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "vig_pyg", "train", "--out", str(out), "--img-size", "33", "--k", "4", "--epochs", "10000",
        "--batch-size", "16", "--limit-train", "64", "--limit-val", "30", "--workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = _wait_for_line(launcher.stdout, "epoch 1/10000")
        workers = {_rank_of(p): p for p in _children(launcher.pid)}
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        rest, _ = launcher.communicate(timeout=60)
        stopped_after = time.monotonic() - t0
    finally:
        launcher.kill()
    output = "".join(seen) + rest
    assert stopped_after < 30
    ours = [line for line in output.splitlines() if "vig-pyg train:" in line]
    assert len(ours) == 1, output  # rank 0's one line (the launcher adds its own report)
    assert "--resume" in ours[0]
    assert f'File "{REPO / "vig_pyg"}' not in output  # no traceback through vig_pyg's code
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1


# -- corruption -----------------------------------------------------------------------------------------
def _flip_a_bit_in_the_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_a_flipped_bit_is_detected(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny(out, epochs=1))
    _flip_a_bit_in_the_largest_tensor(out / "best.pt")
    torch.load(out / "best.pt", weights_only=True)  # torch itself notices nothing
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"best\.pt is corrupt"):
            load(out / "best.pt")
    load_model(out / "last.pt")  # the other copy is fine


# -- data that moved ------------------------------------------------------------------------------------
def test_resume_after_the_data_folder_moved(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n_train=4, n_val=2, size=(40, 40))
    out = tmp_path / "run"
    kw = dict(epochs=2, batch_size=4, workers=0, limit_train=None, limit_val=None)
    train(tiny(out, data=str(data), stop_after=1, **kw))
    moved = data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="no longer exists; pass --data"):
        train(tiny(out, resume=True, **kw), explicit={"out_dir", "resume"})
    other = make_folder(tmp_path / "other", n_train=5, n_val=2, size=(40, 40))
    with pytest.raises(DataError, match="other images"):
        train(tiny(out, resume=True, data=str(other), **kw), explicit={"out_dir", "resume", "data"})
    result = train(tiny(out, resume=True, data=str(moved), **kw), explicit={"out_dir", "resume", "data"})
    assert result.epochs_done == 2
    assert load_checkpoint(out / "last.pt")["config"]["data"] == str(moved.resolve())


def test_a_flipped_bit_in_converted_weights_is_detected(tmp_path: Path) -> None:
    model = vig_pyg.create_model("pvig_test", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_pretrained(model, path)
    fresh = vig_pyg.create_model("pvig_test", num_classes=10)
    load_pretrained(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after safetensors' length-prefixed JSON header
    data[(start + len(data)) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.safetensors is corrupt"):
        load_pretrained(fresh, path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model(path, "pvig_test")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_a_write_waits_for_the_whole_file(tmp_path: Path, signum: int) -> None:
    """A stop arriving inside torch.save's zip writer (a C++ writer calling back into Python) once broke
    the writer ("unexpected pos") or aborted the process; it now takes effect once the file is written."""
    from vig_pyg.cli import Interrupted, _signals_interrupt

    state = {"weights": torch.arange(100_000, dtype=torch.float32), "epoch": 3}
    calls = []

    def write(f) -> None:
        torch.save(state, f)
        os.kill(os.getpid(), signum)  # delivered while the file is still being written
        calls.append("after the signal")

    path = tmp_path / "last.pt"
    with _signals_interrupt((signal.SIGTERM,)), pytest.raises(KeyboardInterrupt) as caught:
        vig_pyg.files.atomic_write(path, write)
    assert calls == ["after the signal"]  # the writer ran to its end
    assert isinstance(caught.value, Interrupted) == (signum == signal.SIGTERM)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored
