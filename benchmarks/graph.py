"""Micro-benchmark of the graph layer alone: graph builders, kNN back-ends, conv aggregation at ViG's sizes.

    python -m benchmarks.graph [--quick] [--out benchmarks/results/graph_cpu.csv]

Each row times one operation on a batch of B graphs; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, median_time, paired_speedup, paired_times, write_csv
from vig_pyg import kernels
from vig_pyg.graph import Graph, PatchGrid, build_graph, knn_graph
from vig_pyg.nn import EdgeConv, GINConv, GraphSAGE, MRConv
from vig_pyg.ops import max_relative
from vig_pyg.ops.aggregate import blocked_max_relative

# (label, query nodes, key nodes, channels) of the Graphers in the official models.
KNN_SIZES = [
    ("pvig_s stage1 (r=4)", 3136, 196, 80),
    ("pvig_s stage2 (r=2)", 784, 196, 160),
    ("pvig_s stage3", 196, 196, 400),
    ("pvig_s stage4", 49, 49, 640),
    ("vig_ti", 196, 196, 192),
    ("vig_b", 196, 196, 640),
    ("pvig_ti stage1 (r=4)", 3136, 196, 48),
    ("point cloud 3-D", 4096, 4096, 3),
]


def bench_knn(batch: int, quick: bool) -> list[dict[str, object]]:
    rows = []
    for label, n, m, c in KNN_SIZES[:3] if quick else KNN_SIZES:
        x = torch.randn(batch * n, c)
        b = torch.arange(batch).repeat_interleave(n)
        y, by = (
            (None, None) if m == n else (torch.randn(batch * m, c), torch.arange(batch).repeat_interleave(m))
        )
        k = 9 if m >= 18 else 4
        times = {}
        for method in ("dense", "torch_cluster"):

            def run(method: str = method, x=x, k=k, b=b, y=y, by=by) -> None:
                knn_graph(x, k, b, y=y, batch_y=by, dilation=2, method=method)

            times[method] = median_time(run, warmup=1, repeats=3 if quick else 5)
        auto = _auto(x, n, m)
        rows.append(
            {
                "op": f"knn_graph k={k} d=2",
                "size": label,
                "batch": batch,
                "nodes": n,
                "keys": m,
                "channels": c,
                "dense_ms": round(times["dense"] * 1e3, 3),
                "torch_cluster_ms": round(times["torch_cluster"] * 1e3, 3),
                "cluster_over_dense": round(times["torch_cluster"] / times["dense"], 2),
                "auto_picks": auto,
            }
        )
    return rows


def _auto(x: torch.Tensor, n: int, m: int) -> str:
    from vig_pyg.graph.knn import choose_method

    return choose_method(x.size(1), n, m)


def bench_aggregation(batch: int, quick: bool) -> list[dict[str, object]]:
    """Each conv's forward with the k-regular (N, k, C) path against PyG's scatter aggregation."""
    rows = []
    n, c, k = 196, 192, 9
    x = torch.randn(batch * n, c)
    ei = knn_graph(x, k, torch.arange(batch).repeat_interleave(n), method="dense")
    regular = Graph.k_regular(ei, k)
    for cls in (MRConv, EdgeConv, GINConv, GraphSAGE):
        conv = cls(c, 2 * c).eval()
        with torch.no_grad():  # called in turn, the speed-up the median of the per-round ratios
            general_ms, fast_ms, speedup = _compare(
                lambda conv=conv: conv(x, ei), lambda conv=conv: conv(x, regular), quick
            )
        rows.append(
            {
                "op": f"{cls.__name__} forward",
                "size": f"{n} nodes x {c} ch, k={k}",
                "batch": batch,
                "k_regular_ms": fast_ms,
                "pyg_aggregation_ms": general_ms,
                "speedup": speedup,
            }
        )
    return rows


# (label, grid side, reduce ratio, channels, k, dilation) of pvig_s_224_gelu's Graphers (first of a stage).
BUILDER_SIZES = [
    ("pvig_s stage1", 56, 4, 80, 9, 1),
    ("pvig_s stage2", 28, 2, 160, 9, 2),
    ("pvig_s stage3", 14, 1, 400, 9, 2),
    ("pvig_s stage4", 7, 1, 640, 9, 5),
]


def bench_builders(batch: int, quick: bool) -> list[dict[str, object]]:
    """One graph per block by each built-in builder, called in turn with ViG's dynamic kNN (dense)."""
    rows = []
    for label, side, r, c, k, d in BUILDER_SIZES[:2] if quick else BUILDER_SIZES:
        grid = PatchGrid(batch, side, side)
        # Low-rank features, as a feature map's are: random ones of these widths are all nearly orthogonal,
        # and a radius graph on them would keep only the nearest node.
        nodes = torch.randn(batch * side * side, 8) @ torch.randn(8, c) + 0.3 * torch.randn(
            batch * side * side, c
        )
        block = {"k": k, "dilation": d, "reduce_ratio": r, "channels": c, "grid_size": (side, side)}
        builders = {
            "knn": build_graph("knn", {"method": "dense", "relative_pos": True}, **block),
            "grid": build_graph("grid", **block),
            "random": build_graph("random", **block),
            "radius": build_graph("radius", **block),
        }
        with torch.no_grad():
            graphs = {name: b(nodes, grid) for name, b in builders.items()}
            fns = {name: (lambda b=b, x=nodes, g=grid: b(x, g)) for name, b in builders.items()}
            times = paired_times(fns, warmup=1, repeats=3 if quick else 7)
        for name in builders:
            rows.append(
                {
                    "op": f"graph={name}",
                    "size": label,
                    "batch": batch,
                    "nodes": side * side,
                    "keys": (side // r) ** 2,
                    "channels": c,
                    "edges_per_node": round(graphs[name].num_edges / nodes.size(0), 2),
                    "ms": round(statistics.median(times[name]) * 1e3, 3),
                    "knn_over_this": round(paired_speedup(times["knn"], times[name]), 2),
                }
            )
    return rows


def _compare(base, new, quick: bool) -> tuple[float, float, float]:
    """Median milliseconds of ``base`` and ``new`` called in turn, and the median per-round speed-up."""
    times = paired_times({"base": base, "new": new}, warmup=1, repeats=3 if quick else 7)
    base_ms, new_ms = (round(statistics.median(times[key]) * 1e3, 3) for key in ("base", "new"))
    return base_ms, new_ms, round(paired_speedup(times["base"], times["new"]), 2)


# (label, query rows per image, keys, k * d) of the selections in pvig_s's Graphers at 224 and 448.
SELECT_SIZES = [
    ("pvig_s stage1 224", 3136, 196, 9),
    ("pvig_s stage2 224", 784, 196, 9),
    ("pvig_s stage3 224 (d=2)", 196, 196, 18),
    ("pvig_s stage1 448", 12544, 784, 9),
    ("pvig_s stage2 448", 3136, 784, 9),
]


def bench_select(batch: int, quick: bool) -> list[dict[str, object]]:
    """The kNN's top-k selection: torch.topk against the compiled kernel (vig_pyg.ops.select)."""
    if not kernels.available():
        return []
    rows = []
    for label, n, m, kd in SELECT_SIZES[:2] if quick else SELECT_SIZES:
        score = torch.randn(batch, n, m)
        base_ms, new_ms, speedup = _compare(
            lambda s=score, kd=kd: torch.topk(s, kd, dim=-1),
            lambda s=score, kd=kd: torch.ops.vig_pyg_cpu.small_topk(s, kd),
            quick,
        )
        rows.append(
            {
                "op": f"top-{kd} of {m}",
                "size": label,
                "batch": batch,
                "topk_ms": base_ms,
                "kernel_ms": new_ms,
                "speedup": speedup,
            }
        )
    return rows


def bench_gather_max(batch: int, quick: bool) -> list[dict[str, object]]:
    """MR's aggregation, ``[x, max_j x_j - x]`` interleaved: one (N, k, C) gather and amax against
    cache-sized row blocks (``vig_pyg.ops.aggregate``, the PyTorch CPU kernel) and the compiled kernel."""
    rows = []
    for label, n, m, c in KNN_SIZES[:2] if quick else KNN_SIZES[:4]:
        x_src, x_dst = torch.randn(batch * m, c), torch.randn(batch * n, c)
        index = torch.randint(0, batch * m, (batch * n * 9,))

        def one_gather(x_src=x_src, x_dst=x_dst, index=index) -> torch.Tensor:
            best = x_src.index_select(0, index).view(-1, 9, x_src.size(1)).amax(dim=1)
            return torch.stack([x_dst, best.sub_(x_dst)], dim=-1).flatten(1)  # [x_0, m_0, x_1, ...]

        def blocks(x_src=x_src, x_dst=x_dst, index=index) -> torch.Tensor:
            return blocked_max_relative(x_src, x_dst, index, 9, False)[0]

        impls = {"one_gather": one_gather, "blocks": blocks}
        if kernels.available():
            impls["kernel"] = lambda x_src=x_src, x_dst=x_dst, index=index: max_relative(
                x_src, x_dst, index, 9, False
            )
        times = paired_times(impls, warmup=1, repeats=3 if quick else 7)
        row: dict[str, object] = {"op": "MR aggregation, 9 neighbours", "size": label, "batch": batch}
        for name in impls:
            row[f"{name}_ms"] = round(statistics.median(times[name]) * 1e3, 3)
        for name in ("blocks", "kernel"):
            if name in times:
                row[f"{name}_speedup"] = round(paired_speedup(times["one_gather"], times[name]), 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (for tests)")
    parser.add_argument(
        "--out", type=Path, default=None, help="CSV prefix (default benchmarks/results/graph_*)"
    )
    args = parser.parse_args(argv)
    env = environment()
    knn_rows = [{**r, **env} for r in bench_knn(args.batch, args.quick)]
    agg_rows = [{**r, **env} for r in bench_aggregation(args.batch, args.quick)]
    select_rows = [{**r, **env} for r in bench_select(args.batch, args.quick)]
    max_rows = [{**r, **env} for r in bench_gather_max(args.batch, args.quick)]
    builder_rows = [{**r, **env} for r in bench_builders(args.batch, args.quick)]
    prefix = args.out or RESULTS / "graph"
    write_csv(Path(f"{prefix}_knn.csv"), knn_rows)
    write_csv(Path(f"{prefix}_aggregation.csv"), agg_rows)
    if select_rows:
        write_csv(Path(f"{prefix}_select.csv"), select_rows)
    write_csv(Path(f"{prefix}_gather_max.csv"), max_rows)
    write_csv(Path(f"{prefix}_builders.csv"), builder_rows)
    for r in builder_rows:
        print(f"{r['size']:>22}: {r['op']:>12} {r['ms']:8.2f} ms  {r['edges_per_node']:>5} edges/node  "
              f"knn / this x{r['knn_over_this']}")  # fmt: skip
    for r in knn_rows:
        ratio = r["cluster_over_dense"]
        print(f"{r['size']:>22}: dense {r['dense_ms']:8.2f} ms  torch_cluster "
              f"{r['torch_cluster_ms']:8.2f} ms  x{ratio:<6} auto={r['auto_picks']}")  # fmt: skip
    for r in agg_rows:
        print(f"{r['op']:>22}: k-regular {r['k_regular_ms']:7.2f} ms  PyG {r['pyg_aggregation_ms']:7.2f} ms  "
              f"x{r['speedup']}")  # fmt: skip
    for r in select_rows:
        print(f"{r['size']:>22}: {r['op']}: torch.topk {r['topk_ms']:7.2f} ms  "
              f"kernel {r['kernel_ms']:7.2f} ms  x{r['speedup']}")  # fmt: skip
    if not select_rows:
        print("top-k selection kernel not built (vig-pyg kernels --build): its rows are left out")
    for r in max_rows:
        kernel = f"  kernel {r['kernel_ms']:7.2f} ms x{r['kernel_speedup']}" if "kernel_ms" in r else ""
        print(f"{r['size']:>22}: {r['op']}: one gather {r['one_gather_ms']:7.2f} ms  "
              f"blocks {r['blocks_ms']:7.2f} ms x{r['blocks_speedup']}{kernel}")  # fmt: skip


if __name__ == "__main__":
    main()
