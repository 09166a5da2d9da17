"""The run folder: one run at a time (a lock), files written in an order that survives a kill anywhere.

Every finished epoch is committed by writing ``last.pt`` first: it holds the whole run (weights, optimizer,
schedule, RNG states, the metrics of every epoch, which epoch scored best). Everything else is derived from
it and written after it: ``best.pt``, ``metrics.csv``, ``metrics.jsonl``, ``config.json``. A kill between
two of those writes leaves derived files one epoch behind; :meth:`RunDir.repair` (run by ``--resume``)
rewrites them from ``last.pt``, so that a resumed folder always has a metrics row per finished epoch, a
``best.pt`` holding the best epoch so far and a ``last.pt`` holding the last one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vig_pyg.errors import CheckpointError, OutputError, RunDirError
from vig_pyg.files import atomic_write_bytes, is_temporary, signals_deferred
from vig_pyg.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["LOCK_NAME", "METRIC_COLUMNS", "RunDir"]

log = logging.getLogger("vig_pyg.train")

#: The lock file inside a run folder while a run holds it.
LOCK_NAME = ".vig_pyg.lock"

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "epoch_time_s",
    "best_val_top1",
]


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity: a diverged value is written as null.
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _metrics_files(history: Sequence[Mapping[str, Any]]) -> tuple[bytes, bytes]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    lines = "".join(
        json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n" for row in history
    )
    return buf.getvalue().encode(), lines.encode()


class RunDir:
    """A run folder held by this process for the length of a run.

    Args:
        path: the folder (created, with its parents, when missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: Any = None
        self._created = False
        self._wrote = False
        self._foreign_best = False  # a best.pt of the run that --overwrite replaces

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    # -- holding the folder -------------------------------------------------------------------------------
    def acquire(self, create: bool = True) -> None:
        """Create the folder if needed (and ``create``) and lock it for this process.

        The lock is an advisory ``flock`` on :data:`LOCK_NAME`: the system releases it when its process
        ends in any way, so a lock file left by a killed run never blocks the next one.

        Raises:
            RunDirError: another process holds the folder (its pid, host and start are named), or the path
                is not a usable folder.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; choose a folder")
        if not create and not self.path.is_dir():
            raise RunDirError(
                f"nothing to resume in {self.path}: the folder does not exist; check --out, or drop --resume "
                "to start a new run"
            )
        try:
            if not self.path.is_dir():
                self.path.mkdir(parents=True)
                self._created = True
            self._lock = self._take_lock()
        except OSError as err:
            raise OutputError(
                f"cannot use {self.path} as the run folder ({err.strerror or err}); choose a folder you can "
                "write to"
            ) from None

    def _take_lock(self) -> Any:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected from each other
            return None
        lock_path = self.path / LOCK_NAME
        while True:
            f = open(lock_path, "a+")  # held open (and locked) for the run
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                raise RunDirError(
                    f"{self.path} is in use by another training run ({holder or 'a process starting up'}); "
                    "wait for it to finish, or choose another --out"
                ) from None
            # A holder that just finished may have removed the file we opened: lock the one on disk.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n")
        f.flush()
        return f

    def release(self) -> None:
        """Unlock; a folder this run created and never wrote to is removed again."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            self._lock.close()  # closing releases the flock
            self._lock = None
        if self._created and not self._wrote:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    # -- what the folder holds ----------------------------------------------------------------------------
    def _leftovers(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name == LOCK_NAME or is_temporary(p.name)]

    def _run_files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK_NAME and not is_temporary(p.name)]

    def clean_temporary(self) -> None:
        """Remove temporary files of killed writers (only safe while holding the lock)."""
        for p in self._leftovers():
            if p.name != LOCK_NAME:
                log.info("removing %s, left by an interrupted write", p)
                with contextlib.suppress(OSError):
                    p.unlink()

    def check_new_run(self, overwrite: bool) -> None:
        """A new run needs a folder without another run's files, or ``overwrite``."""
        if self._run_files() and not overwrite:
            raise RunDirError(
                f"{self.path} already holds files; pass --resume to continue that run, --overwrite to "
                "replace it, or choose another --out"
            )
        self._foreign_best = self.best.exists()

    def can_resume(self) -> bool:
        """Whether there is a finished epoch to resume from.

        A folder holding nothing but what an interrupted first epoch leaves (temporary files, the lock
        file) has none: the run starts from the beginning.

        Raises:
            RunDirError: there is nothing to resume and the folder holds other files.
        """
        if self.last.is_file():
            return True
        if self._run_files():
            raise RunDirError(
                f"nothing to resume in {self.path}: it has no last.pt; drop --resume to start a new run "
                "(with --overwrite to replace its files) or choose another --out"
            )
        return False

    # -- writing ------------------------------------------------------------------------------------------
    def commit(
        self,
        state: Mapping[str, Any],
        is_best: bool,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one finished epoch: ``last.pt``, then the files derived from it.

        Args:
            state: the training checkpoint (its ``history`` holds every epoch's metrics).
            is_best: the epoch scored best so far (``best.pt`` becomes a copy).
            config: also (re)write ``config.json`` (the first epoch of an invocation).

        Raises:
            OutputError: a file could not be written (full disk, ...); the files before it are intact.
        """
        try:
            # A stop signal waits for the whole epoch's files: a stopped run's folder is consistent as it
            # is (a kill still can split them; the next run repairs that, see repair()).
            with signals_deferred():
                self._write_epoch(state, is_best, config)
        except OutputError as err:
            raise OutputError(
                f"{err}; the run's files of earlier epochs are intact, and --resume continues the run"
            ) from None

    def _write_epoch(self, state: Mapping[str, Any], is_best: bool, config: Mapping[str, Any] | None) -> None:
        save_checkpoint(state, self.last)
        self._wrote = True
        if is_best:
            save_checkpoint(state, self.best)
            self._foreign_best = False
        elif self._foreign_best:
            self.best.unlink(missing_ok=True)  # the replaced run's, while this run has none of its own
            self._foreign_best = False
        self.write_metrics(state["history"])
        if config is not None:
            self.write_config(config)

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        # The whole history is rewritten each epoch: a few hundred rows at most, and the files then always
        # match last.pt.
        table, lines = _metrics_files(history)
        atomic_write_bytes(self.path / "metrics.csv", table)
        atomic_write_bytes(self.path / "metrics.jsonl", lines)

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / "config.json", (json.dumps(dict(config), indent=2) + "\n").encode())

    # -- repairing ----------------------------------------------------------------------------------------
    def _holds_best_of(self, last: Mapping[str, Any]) -> bool:
        """Whether ``best.pt`` is the best epoch of the run that ``last`` belongs to."""
        try:
            best = load_checkpoint(self.best)
        except CheckpointError:
            return False
        return best.get("run_id") == last.get("run_id") and best["epoch"] == last["best_epoch"]

    def repair(self, last: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Bring the files derived from ``last.pt`` up to it, after a kill at any point of a commit.

        Args:
            last: the loaded ``last.pt``.
            config: the resumed run's configuration (``config.json``).
        """
        self.clean_temporary()
        self._wrote = True
        best_epoch, epoch = int(last["best_epoch"]), int(last["epoch"])
        if best_epoch == 0:  # no epoch has scored yet (all diverged)
            if self.best.exists() and not self._holds_best_of(last):
                self.best.unlink()
        elif not self._holds_best_of(last):
            if best_epoch == epoch:
                log.info("best.pt is behind last.pt (an interrupted epoch): writing it again")
                save_checkpoint(last, self.best)
            else:
                log.warning(
                    "%s does not hold epoch %d, the run's best so far (missing or replaced), and cannot be "
                    "restored: it is written again when a later epoch scores better",
                    self.best,
                    best_epoch,
                )
        self.write_metrics(last["history"])
        self.write_config(config)
