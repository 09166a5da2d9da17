"""Building the compiled kernels: no stuck state after a killed build, and word of what a build waits for."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from vig_pyg import kernels


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``kernels.build`` into an empty folder, with the compiler replaced by a recorder."""
    monkeypatch.setenv("VIG_PYG_OPS_DIR", str(tmp_path / "ops"))
    monkeypatch.setattr(kernels, "_loaded", False)  # as if never built (restored afterwards)
    calls: dict = {"n": 0}

    def compile_(**kwargs) -> None:
        calls["n"] += 1
        calls["baton_left"] = (Path(kwargs["build_directory"]) / "lock").exists()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_)
    return calls


def test_a_killed_builds_lock_file_does_not_block_the_next_build(fresh_build: dict) -> None:
    directory = kernels._build_dir()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # what torch's cpp_extension leaves when a build is killed
    kernels.build()
    assert fresh_build == {"n": 1, "baton_left": False}


def test_a_build_says_what_it_waits_for(fresh_build: dict, caplog: pytest.LogCaptureFixture) -> None:
    directory = kernels._build_dir()
    directory.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, time\n"
            f"f = open({str(directory / 'build.lock')!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242'); f.flush()\n"
            "print('locked', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.INFO, logger="vig_pyg.kernels"):
            builder = threading.Thread(target=kernels.build)
            builder.start()
            builder.join(timeout=2)
            assert builder.is_alive() and fresh_build["n"] == 0  # waiting for the holder
            assert "waiting for another build of the kernels to finish (pid 4242 holds" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    builder.join(timeout=30)
    assert not builder.is_alive() and fresh_build["n"] == 1  # the holder's death released the lock
