"""vig_pyg models against the dense reference (the official algorithm, un-optimised), side by side.

    python -m benchmarks.models [--models pvig_s_224_gelu ...] [--batch 8] [--size 224] [--train]
                                [--compile] [--quick] [--out benchmarks/results/models_cpu.csv]

For each variant both implementations get the same weights (converted from the reference's official
layout); each is timed for the eval forward (and with ``--train`` a training step: forward, backward,
AdamW step) with warm-up, the two implementations called in turn, and the speed-up taken as the
median of the per-round ratios. ``--compile`` times both under ``torch.compile`` instead (eval only;
``runtime`` says which, and ``eager_img_per_s`` is the same model's eager speed in the same process).
Every (model, size, batch) runs in a fresh process: on CPU a model's
speed depends on the state the allocator was left in (measured: pvig_s eval at 2.5x after pvig_ti's
training step in the same process, 3.5x on its own). Peak memory (``*_peak_mb``): on CPU (Linux)
measured in another fresh process per model as the peak growth of the bytes the allocator holds for
the program over one call (with the resident-set growth beside it, ``*_rss_mb``; see
:func:`peak_memory_mb`); on CUDA the allocator's peak above what was allocated before the call.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, paired_speedup, paired_times, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dense_reference import REFERENCE_VARIANTS, DenseDilatedKnnGraph, build_reference

import vig_pyg
from vig_pyg import kernels
from vig_pyg.graph import GridKNNGraph
from vig_pyg.models import convert_official

DEFAULT_MODELS = [
    "pvig_ti_224_gelu",
    "pvig_s_224_gelu",
    "pvig_m_224_gelu",
    "vig_ti_224_gelu",
    "vig_s_224_gelu",
]


_MEMORY_SNIPPET = """
import ctypes, re, sys, threading, time, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks.models import make_pair
name, impl, size, batch, train = {args!r}
torch.manual_seed(0)
ref, ours = make_pair(name, torch.device("cpu"), size)
model = ref if impl == "dense_reference" else ours
del ref, ours
x = torch.randn(batch, 3, size, size)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
target = torch.randint(1000, (batch,))

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def in_use():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20
def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
samples, done = [], threading.Event()
def sample():
    while not done.is_set():
        samples.append(in_use())
        time.sleep(0.0002)
base_rss, base_in_use = rss("VmRSS"), in_use()
sampler = threading.Thread(target=sample)
sampler.start()
if train:
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
else:
    model.eval()
    with torch.no_grad():
        model(x)
done.set()
sampler.join()
print(max(samples) - base_in_use, rss("VmHWM") - base_rss)
"""


def peak_memory_mb(name: str, impl: str, size: int, batch: int, train: bool) -> tuple[float, float]:
    """Peak working memory of one call (CPU), measured in a fresh process: ``(in_use, rss)``.

    ``in_use``: the peak growth of the bytes glibc's allocator has handed out and not taken back
    (``mallinfo2``, sampled every 0.2 ms), the CPU counterpart of CUDA's ``max_memory_allocated``.
    ``rss``: the growth of the resident-set high-water mark. The two differ because glibc keeps freed
    heap memory instead of returning it to the OS, and fresh allocations in backward do not always fit
    the freed holes; the RSS therefore depends on the allocator's heuristics as much as on the model
    (``MALLOC_MMAP_THRESHOLD_=4194304`` brings it close to ``in_use``). Both count everything the call
    allocates: activations, gradients and, for training, the optimizer state created in the first step.
    """
    root = str(Path(__file__).resolve().parents[1])
    code = _MEMORY_SNIPPET.format(root=root, args=(name, impl, size, batch, train))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    in_use, rss = out.stdout.strip().splitlines()[-1].split()
    return float(in_use), float(rss)


def cuda_peak_memory_mb(fn) -> tuple[float, float]:
    """Peak CUDA memory one call allocates above what was allocated before it (no RSS: NaN)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, float("nan")


def knn_share(model: torch.nn.Module, forward, repeats: int = 3) -> float:
    """Share of the eval forward's time spent building kNN graphs (median of ``repeats`` calls).

    Timed with hooks around every kNN module (vig_pyg's ``GridKNNGraph``, the reference's
    ``DenseDilatedKnnGraph``); on CUDA the times are meaningless without syncs, so this is for CPU.
    """
    modules = [m for m in model.modules() if type(m) in (GridKNNGraph, DenseDilatedKnnGraph)]
    spent, starts = [0.0], []

    def start(*_):
        starts.append(time.perf_counter())

    def stop(*_):
        spent[0] += time.perf_counter() - starts.pop()

    handles = [
        h for m in modules for h in (m.register_forward_pre_hook(start), m.register_forward_hook(stop))
    ]
    shares = []
    try:
        for _ in range(repeats):
            spent[0] = 0.0
            t0 = time.perf_counter()
            forward()
            shares.append(spent[0] / (time.perf_counter() - t0))
    finally:
        for h in handles:
            h.remove()
    return statistics.median(shares)


def make_pair(name: str, device: torch.device, size: int = 224):
    # Both built for the input size: the reference as if the official code had been written for it.
    ref = build_reference(**REFERENCE_VARIANTS[name], img_size=size).to(device)
    ours = vig_pyg.create_model(name, img_size=size).to(device)
    ours.load_state_dict(convert_official(ref.state_dict(), ours))
    return ref, ours


def bench_model(
    name: str, batch: int, size: int, train: bool, quick: bool, device, dtype, compiled: bool = False
) -> list[dict]:
    if compiled:
        return bench_compiled(name, batch, size, quick, device, dtype)
    ref, ours = make_pair(name, device, size)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(1000, (batch,), device=device)
    repeats = 3 if quick else 9
    sync = device.type == "cuda"
    impls = {"dense_reference": ref, "vig_pyg": ours}
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward_fn(model):
        def forward():
            with torch.no_grad(), torch.autocast(**autocast):
                return model(x)

        return forward

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        return step

    for model in impls.values():
        model.eval()
    forwards = {impl: forward_fn(model) for impl, model in impls.items()}
    eval_times = paired_times(forwards, warmup=2, repeats=repeats, sync=sync)
    shares = {impl: knn_share(model, forwards[impl]) for impl, model in impls.items()} if not sync else {}
    eval_mem = {
        impl: peak_memory_mb(name, impl, size, batch, False)
        if device.type == "cpu"
        else cuda_peak_memory_mb(forwards[impl])
        for impl in impls
    }
    if train:
        for model in impls.values():
            model.train()
        steps = {impl: step_fn(model) for impl, model in impls.items()}
        train_times = paired_times(steps, warmup=1, repeats=max(3, repeats // 2), sync=sync)
        train_mem = {
            impl: peak_memory_mb(name, impl, size, batch, True)
            if device.type == "cpu"
            else cuda_peak_memory_mb(steps[impl])
            for impl in impls
        }
    rows = []
    for impl in impls:
        row = {
            "model": name,
            "impl": impl,
            "batch": batch,
            "size": size,
            "dtype": str(dtype).replace("torch.", ""),
            "eval_img_per_s": round(batch / statistics.median(eval_times[impl]), 2),
            "eval_peak_mb": round(eval_mem[impl][0], 1),
            "eval_rss_mb": round(eval_mem[impl][1], 1),
            "eval_speedup": round(paired_speedup(eval_times["dense_reference"], eval_times[impl]), 2),
            "eval_knn_share": round(shares[impl], 3) if shares else "",
            "runtime": "eager",
        }
        if train:
            row.update(
                {
                    "train_img_per_s": round(batch / statistics.median(train_times[impl]), 2),
                    "train_peak_mb": round(train_mem[impl][0], 1),
                    "train_rss_mb": round(train_mem[impl][1], 1),
                    "train_speedup": round(
                        paired_speedup(train_times["dense_reference"], train_times[impl]), 2
                    ),
                    "train_mem_ratio": round(train_mem[impl][0] / train_mem["dense_reference"][0], 2),
                    "train_rss_ratio": round(train_mem[impl][1] / train_mem["dense_reference"][1], 2),
                }
            )
        rows.append(row)
    return rows


def bench_compiled(name: str, batch: int, size: int, quick: bool, device, dtype) -> list[dict]:
    """Eval under ``torch.compile`` (default mode) for both implementations, beside their eager speed."""
    ref, ours = make_pair(name, device, size)
    x = torch.randn(batch, 3, size, size, device=device)
    sync = device.type == "cuda"
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    models = {"dense_reference": ref.eval(), "vig_pyg": ours.eval()}

    def forward_fn(model):
        def forward():
            with torch.no_grad(), torch.autocast(**autocast):
                return model(x)

        return forward

    compiled = {impl: forward_fn(torch.compile(m)) for impl, m in models.items()}
    for forward in compiled.values():  # compile outside the timed rounds
        forward()
    eager = {impl: forward_fn(m) for impl, m in models.items()}
    repeats = 3 if quick else 9
    times = paired_times(
        {**{f"{i} compiled": f for i, f in compiled.items()}, **eager}, warmup=1, repeats=repeats, sync=sync
    )
    rows = []
    for impl in models:
        rows.append(
            {
                "model": name,
                "impl": impl,
                "batch": batch,
                "size": size,
                "dtype": str(dtype).replace("torch.", ""),
                "eval_img_per_s": round(batch / statistics.median(times[f"{impl} compiled"]), 2),
                "eval_speedup": round(
                    paired_speedup(times["dense_reference compiled"], times[f"{impl} compiled"]), 2
                ),
                "runtime": "compile",
                "eager_img_per_s": round(batch / statistics.median(times[impl]), 2),
                "compiled_vs_eager": round(paired_speedup(times[impl], times[f"{impl} compiled"]), 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--size", type=int, nargs="+", default=[224])
    parser.add_argument("--train", action="store_true", help="also time a training step and its memory")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="time eval under torch.compile instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-kernels",
        action="store_true",
        help="vig_pyg without its compiled CPU kernels (VIG_PYG_NO_KERNELS=1): the PyTorch paths",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.no_kernels:
        os.environ["VIG_PYG_NO_KERNELS"] = "1"  # inherited by the fresh processes below
    if args.compile and args.train:
        parser.error("--compile times eval only; leave out --train")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    env = {"kernels": "off" if args.no_kernels or not kernels.available() else "on", **environment()}
    rows = []
    for name in args.models:
        for size in args.size:
            for batch in args.batch:
                config = (name, batch, size, args.train, args.quick, device, dtype, args.compile)
                with multiprocessing.get_context("spawn").Pool(1) as fresh:  # see the module docstring
                    config_rows = fresh.apply(bench_model, config)
                for row in config_rows:
                    rows.append({**row, **env})
                    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    suffix = "_compiled" if args.compile else ""
    out = args.out or RESULTS / f"models_{device.type}{suffix}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
