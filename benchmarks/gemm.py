"""A 1x1 layer's GEMM two ways at Pyramid ViG-S's shapes: ``F.linear`` on the channels-last node view
(MKL's sgemm on x86) against a 1x1 ``F.conv2d`` on the channels-last map (oneDNN).

Which is faster depends on the processor (see :mod:`vig_pyg.tuning`, which makes the same measurement
per layer when a model is built with ``gemm="auto"``). Rows: batch 8 at 224 (and one 448 row), GFLOP/s
of the forward and of forward + backward, and the ratios conv / linear. Run::

    python -m benchmarks.gemm          # writes this CPU's rows of benchmarks/results/gemm_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, write_csv
from vig_pyg.tuning import measure_gemm

# (name, rows, in, out): rows = batch 8 x the stage's nodes; pvig_s widths 80/160/320/640, FFN ratio 4.
SHAPES = [
    ("pvig_s stage1 ffn fc1", 8 * 56 * 56, 80, 320),
    ("pvig_s stage1 ffn fc2", 8 * 56 * 56, 320, 80),
    ("pvig_s stage1 grapher fc", 8 * 56 * 56, 80, 80),
    ("pvig_s stage2 ffn fc1", 8 * 28 * 28, 160, 640),
    ("pvig_s stage3 ffn fc1", 8 * 14 * 14, 320, 1280),
    ("pvig_s stage3 ffn fc2", 8 * 14 * 14, 1280, 320),
    ("pvig_s stage4 ffn fc1", 8 * 7 * 7, 640, 2560),
    ("pvig_s 448 stage2 ffn fc1", 4 * 56 * 56, 160, 640),  # batch 4 at 448
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "gemm_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for name, n, cin, cout in SHAPES:
        times = measure_gemm(n, cin, cout, repeats=args.repeats)
        flops = 2 * n * cin * cout  # forward; the step is forward + two backward GEMMs
        (lin_f, lin_s), (conv_f, conv_s) = times["linear"], times["conv"]
        rows.append(
            {
                "shape": name,
                "rows": n,
                "in": cin,
                "out": cout,
                "linear_gflops": round(flops / lin_f / 1e9, 1),
                "conv_gflops": round(flops / conv_f / 1e9, 1),
                "linear_step_gflops": round(3 * flops / lin_s / 1e9, 1),
                "conv_step_gflops": round(3 * flops / conv_s / 1e9, 1),
                "conv_over_linear": round(lin_f / conv_f, 2),
                "conv_over_linear_step": round(lin_s / conv_s, 2),
                **env,
            }
        )
        print(rows[-1])
    # Rows measured on other processors stay: the point of the table is how the two kernels compare there.
    out = Path(args.out)
    if out.exists():
        with out.open(newline="") as f:
            others = [row for row in csv.DictReader(f) if row.get("device") != env["device"]]
        rows = others + rows
    write_csv(out, rows)


if __name__ == "__main__":
    main()
