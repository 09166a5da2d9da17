"""Timing and result-writing helpers shared by the benchmark scripts."""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_geometric

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, str]:
    """Machine, thread count, library versions and git revision, recorded with every row."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        revision = rev.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "vig_pyg"], capture_output=True, text=True
        ).stdout
        revision += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return {
        "device": device,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "pyg": torch_geometric.__version__,
        "git": revision,
    }


def median_time(fn: Callable[[], object], warmup: int = 2, repeats: int = 7, sync: bool = False) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    return statistics.median(paired_times({"fn": fn}, warmup, repeats, sync)["fn"])


def paired_times(
    fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7, sync: bool = False
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of every function, taken in turn (A, B, A, B, ...) after warm-up.

    On a shared machine the speed drifts over seconds; interleaving puts every pair of calls under the
    same conditions, so the ratio of a pair is far steadier than the ratio of two separate medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_speedup(base: list[float], new: list[float]) -> float:
    """Median over rounds of ``base / new``: how many times faster ``new`` ran beside ``base``."""
    return statistics.median(b / n for b, n in zip(base, new))


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """Write rows (same keys) to ``path``, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
