"""vig_pyg models against the dense reference (the official algorithm, un-optimised), side by side.

    python -m benchmarks.models [--models pvig_s_224_gelu ...] [--batch 8] [--size 224] [--train]
                                [--quick] [--out benchmarks/results/models_cpu.csv]

For each variant both implementations get the same weights (converted from the reference's official
layout); each is timed for the eval forward (and with ``--train`` a training step: forward, backward,
AdamW step) with warm-up and the median of several runs. Peak memory: on CPU (Linux) measured in a fresh
process per model, as the growth of the resident-set high-water mark over one call; on CUDA the allocator's
peak above what was allocated before the call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, median_time, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dense_reference import REFERENCE_VARIANTS, build_reference

import vig_pyg
from vig_pyg.models import convert_official

DEFAULT_MODELS = [
    "pvig_ti_224_gelu",
    "pvig_s_224_gelu",
    "pvig_m_224_gelu",
    "vig_ti_224_gelu",
    "vig_s_224_gelu",
]


_MEMORY_SNIPPET = """
import re, sys, torch
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
def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
base = rss("VmRSS")
if train:
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
else:
    model.eval()
    with torch.no_grad():
        model(x)
print(rss("VmHWM") - base)
"""


def peak_memory_mb(name: str, impl: str, size: int, batch: int, train: bool) -> float:
    """Peak working memory of one call (CPU), measured in a fresh process.

    The growth of the resident-set high-water mark over the first call, after the model, input and
    optimizer exist: a fresh process has no freed heap to reuse, so this is what the call needs at its
    peak (the optimizer's state, created in the first step, is included for training).
    """
    root = str(Path(__file__).resolve().parents[1])
    code = _MEMORY_SNIPPET.format(root=root, args=(name, impl, size, batch, train))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak_memory_mb(fn) -> float:
    """Peak CUDA memory one call allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_pair(name: str, device: torch.device, size: int = 224):
    # Both built for the input size: the reference as if the official code had been written for it.
    ref = build_reference(**REFERENCE_VARIANTS[name], img_size=size).to(device)
    ours = vig_pyg.create_model(name, img_size=size).to(device)
    ours.load_state_dict(convert_official(ref.state_dict(), ours))
    return ref, ours


def bench_model(name: str, batch: int, size: int, train: bool, quick: bool, device, dtype) -> list[dict]:
    ref, ours = make_pair(name, device, size)
    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    repeats = 3 if quick else 7
    sync = device.type == "cuda"
    impls = {"dense_reference": ref, "vig_pyg": ours}
    results: dict[str, dict[str, float]] = {}
    for impl, model in impls.items():
        model.eval()

        def forward(model=model):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model(x)

        t = median_time(forward, warmup=2, repeats=repeats, sync=sync)
        mem = (
            peak_memory_mb(name, impl, size, batch, False)
            if device.type == "cpu"
            else cuda_peak_memory_mb(forward)
        )
        results[impl] = {"eval_s": t, "eval_mem": mem}
        if train:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            target = torch.randint(1000, (batch,), device=device)

            def step(model=model, opt=opt, target=target):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                opt.step()

            results[impl]["train_s"] = median_time(step, warmup=1, repeats=max(3, repeats // 2), sync=sync)
            results[impl]["train_mem"] = (
                peak_memory_mb(name, impl, size, batch, True)
                if device.type == "cpu"
                else cuda_peak_memory_mb(step)
            )
    base = results.get("dense_reference")
    for impl, r in results.items():
        row = {
            "model": name,
            "impl": impl,
            "batch": batch,
            "size": size,
            "dtype": str(dtype).replace("torch.", ""),
            "eval_img_per_s": round(batch / r["eval_s"], 2),
            "eval_peak_mb": round(r["eval_mem"], 1),
            "eval_speedup": round(base["eval_s"] / r["eval_s"], 2) if base else "",
        }
        if train:
            row.update(
                {
                    "train_img_per_s": round(batch / r["train_s"], 2),
                    "train_peak_mb": round(r["train_mem"], 1),
                    "train_speedup": round(base["train_s"] / r["train_s"], 2) if base else "",
                    "train_mem_ratio": round(r["train_mem"] / base["train_mem"], 2) if base else "",
                }
            )
        rows.append(row)
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    env = environment()
    rows = []
    for name in args.models:
        for size in args.size:
            for batch in args.batch:
                for row in bench_model(name, batch, size, args.train, args.quick, device, dtype):
                    rows.append({**row, **env})
                    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = args.out or RESULTS / f"models_{device.type}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
