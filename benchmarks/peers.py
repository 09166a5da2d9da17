"""Pyramid ViG-S (vig_pyg) against the models a user would pick instead, in every runtime users run.

    python -m benchmarks.peers [--impls vig_pyg dense_reference timm_convnext_tiny timm_swin_tiny]
                               [--runtimes eager compile onnx [train]] [--batch 8] [--size 224]
                               [--threads 2] [--rounds 1] [--quick] [--out benchmarks/results/peers_cpu.csv]

The models (``impl``): vig_pyg's ``pvig_s_224_gelu``; the dense reference (``tests/dense_reference.py``,
the official algorithm computed the way the official code does, with the same weights as vig_pyg's, see
:func:`benchmarks.models.make_pair`); and the two models of the same size (about 28 M parameters, 4.5
GFLOPs) a user would take from timm instead, ``convnext_tiny`` and ``swin_tiny_patch4_window7_224``
(random weights: nothing is downloaded; timm is imported through :mod:`benchmarks.timm_standin`, which
lets it import without torchvision). The runtimes: eager PyTorch, ``torch.compile(model)`` (default
mode) and ONNX Runtime's CPU provider (``intra_op_num_threads=--threads``, ``inter_op_num_threads=1``).
vig_pyg is exported with :func:`vig_pyg.export.export_onnx`, which applies its operators'
decompositions; the other models with ``torch.onnx.export(..., dynamo=True)``; all with a dynamic batch
axis and opset 18, as ``export_onnx`` does by default. ``train`` (not run by default: ``--runtimes train``)
times one eager training step in ``model.train()``: the forward on the seeded batch, cross-entropy against
seeded random labels (1000 classes), backward, a ``torch.optim.AdamW`` step and
``zero_grad(set_to_none=True)``; no model has drop path or dropout (timm's built with ``drop_path_rate=0``
and ``drop_rate=0``, Pyramid ViG's rates are 0 by default; the step refuses a model with a nonzero rate),
and vig_pyg keeps its defaults (its memory-saving operators on).

All in fp32 with ``torch.set_num_threads(--threads)``; all but ``train`` in eval mode, without gradients.
Each row's ``img_per_s`` is the batch over the median seconds of ``--repeats`` calls (steps for ``train``)
after warm-up; the first call (which compiles, or follows the export and the session's creation) is
timed apart as ``setup_s``, with inductor's on-disk cache empty (``TORCHINDUCTOR_CACHE_DIR``, a fresh
folder per process): a cold compile. ``vig_pyg_ratio`` is vig_pyg's speed over the row's in the same
runtime (above 1: vig_pyg is faster), ``vs_eager`` the row's speed over the same model's eager speed
(empty for ``train``). ``max_rel_err`` compares the compiled or ONNX output with the eager model's on the
timed input: the largest difference over the largest eager logit (randomly initialised, Pyramid ViG-S's
logits are around 1e7). ``graph_breaks`` and ``graphs`` are TorchDynamo's counts under ``torch.compile``
(``notes`` names the breaks). A runtime that fails for a model leaves a row with its ``error`` instead of
stopping the run.

Every (model, runtime, batch, size) runs in a fresh process, one after another: on CPU a model's speed
depends on the state earlier work left glibc's allocator in (see :mod:`benchmarks.models`), and a compiled
model or an ONNX Runtime session must not share the process with another. Since two processes cannot
interleave their calls the way :func:`benchmarks.common.paired_times` does, ``--rounds N`` runs the whole
sweep N times, the processes of one round in turn, and takes each speed as the median over rounds and
each ratio as the median of the per-round ratios, steadier on a shared machine than one round.

``--out`` keeps the rows of an existing CSV that this run does not measure: a row is replaced only by one
with the same ``impl``, ``runtime``, ``batch``, ``size`` and ``device``, so that e.g. ``--runtimes train``
adds its rows beside the eval ones.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, median_time, paired_speedup, write_csv

ROOT = Path(__file__).resolve().parents[1]
VIG_MODEL = "pvig_s_224_gelu"
#: impl -> the model's name in its library.
MODELS = {
    "vig_pyg": VIG_MODEL,
    "dense_reference": VIG_MODEL,
    "timm_convnext_tiny": "convnext_tiny",
    "timm_swin_tiny": "swin_tiny_patch4_window7_224",
}
RUNTIMES = ("eager", "compile", "onnx", "train")
DEFAULT_RUNTIMES = ("eager", "compile", "onnx")
#: The columns an output row is matched on: a new row replaces an existing one with the same values.
ROW_KEY = ("impl", "runtime", "batch", "size", "device")
_RESULT = "PEERS_RESULT "
_STAGE = "PEERS_STAGE "


def build_model(impl: str, size: int) -> torch.nn.Module:
    """The model ``impl`` names, for ``size`` x ``size`` images, in eval mode (weights seeded)."""
    torch.manual_seed(0)
    if impl in ("vig_pyg", "dense_reference"):
        from benchmarks.models import make_pair

        ref, ours = make_pair(VIG_MODEL, torch.device("cpu"), size)
        return (ours if impl == "vig_pyg" else ref).eval()
    from benchmarks.timm_standin import import_timm

    timm = import_timm()
    kwargs = {"img_size": size} if impl == "timm_swin_tiny" else {}
    model = timm.create_model(MODELS[impl], pretrained=False, drop_path_rate=0.0, drop_rate=0.0, **kwargs)
    return model.eval()


def _no_grad(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    def forward():
        with torch.no_grad():
            return fn(x)

    return forward


def prepare_eager(impl: str, model: torch.nn.Module, x: torch.Tensor, threads: int, info: dict):
    return _no_grad(model, x)


def prepare_compile(impl: str, model: torch.nn.Module, x: torch.Tensor, threads: int, info: dict):
    """``torch.compile(model)``; the graph-break counts are read after the first (compiling) call."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = _no_grad(torch.compile(model), x)

    def first_call():
        out = compiled()
        breaks = counters["graph_break"]
        info["graph_breaks"] = sum(breaks.values())
        info["graphs"] = counters["stats"]["unique_graphs"]
        if breaks:
            reasons = [f"{n}x {' '.join(reason.split())[:120]}" for reason, n in breaks.most_common(3)]
            info["notes"] = "graph breaks: " + " | ".join(reasons)
        return out

    info["first_call"] = first_call
    return compiled


def export_peer_onnx(model: torch.nn.Module, path: Path, input_size: tuple[int, ...], opset: int = 18):
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch axis, as ``export_onnx`` does for vig_pyg."""
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    program = torch.onnx.export(
        model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        input_names=["images"], output_names=["logits"], verbose=False,
    )  # fmt: skip
    program.save(str(path))


def prepare_onnx(impl: str, model: torch.nn.Module, x: torch.Tensor, threads: int, info: dict):
    """Export to a temporary file, then an ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    folder = tempfile.TemporaryDirectory(prefix="vig_pyg_peers_")
    info["keep"] = folder  # removed when the process ends
    path = Path(folder.name) / f"{impl}.onnx"
    if impl == "vig_pyg":
        from vig_pyg.export import export_onnx

        export_onnx(model, path, input_size=tuple(x.shape[1:]))
    else:
        export_peer_onnx(model, path, tuple(x.shape[1:]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}

    def forward():
        return torch.from_numpy(session.run(None, feed)[0])

    return forward


def drop_rates(model: torch.nn.Module) -> dict[str, float]:
    """The modules that drop activations in training (dropout, drop path) with a nonzero rate."""
    rates = {}
    for name, module in model.named_modules():
        rate = getattr(module, "drop_prob", None)  # timm's and the dense reference's DropPath
        if rate is None and isinstance(module, torch.nn.modules.dropout._DropoutNd):
            rate = module.p
        if rate is None and type(module).__name__ == "DropPath":  # vig_pyg's
            rate = getattr(module, "p", None)
        if rate:
            rates[name or type(module).__name__] = float(rate)
    return rates


def prepare_train(impl: str, model: torch.nn.Module, x: torch.Tensor, threads: int, info: dict):
    """One eager training step: forward, cross-entropy on seeded random labels, backward, AdamW step."""
    model.train()
    rates = drop_rates(model)
    if rates:
        raise ValueError(f"drop path / dropout must be 0 for the training step: {rates}")
    labels = torch.randint(1000, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


PREPARE = {"eager": prepare_eager, "compile": prepare_compile, "onnx": prepare_onnx, "train": prepare_train}


def run_config(impl: str, runtime: str, batch: int, size: int, threads: int, warmup: int, repeats: int):
    """One (model, runtime, batch, size) in this process: the measurements of one row (see the docstring)."""
    torch.set_num_threads(threads)
    result: dict[str, object] = {"seconds": None, "setup_s": None, "error": ""}
    info: dict[str, object] = {}
    stage = "build"
    try:
        _stage(stage)
        model = build_model(impl, size)
        result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        stage = "export" if runtime == "onnx" else runtime
        _stage(stage)
        t0 = time.perf_counter()
        forward = PREPARE[runtime](impl, model, x, threads, info)
        stage = "first call"
        _stage(stage)
        out = info.pop("first_call", forward)()
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        stage = "timing"
        _stage(stage)
        result["seconds"] = median_time(forward, warmup=warmup, repeats=repeats)
        if runtime not in ("eager", "train"):
            stage = "check"
            with torch.no_grad():
                expected = model(x)
            result["max_rel_err"] = float((out - expected).abs().max() / expected.abs().max())
    except Exception as err:
        message = " ".join(str(err).split())[:300]
        result["error"] = f"{stage}: {type(err).__name__}: {message}"
    for key in ("graph_breaks", "graphs", "notes"):
        if key in info:
            result[key] = info[key]
    return result


def _stage(stage: str) -> None:
    print(_STAGE + stage, flush=True)


def child_main(config: str) -> None:
    """Entry point of the fresh process: run one configuration and print its result as JSON."""
    result = run_config(**json.loads(config))
    print(_RESULT + json.dumps(result), flush=True)


def spawn(config: dict, timeout: float) -> dict:
    """Run one configuration in a fresh Python process (its own session, killed whole on timeout)."""
    code = "import sys; from benchmarks.peers import child_main; child_main(sys.argv[1])"
    with tempfile.TemporaryDirectory(prefix="vig_pyg_peers_inductor_") as cache:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(config)], cwd=ROOT, text=True,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and the compile workers it started
            stdout, stderr = proc.communicate()
            timed_out = True
    lines = stdout.splitlines()
    for line in reversed(lines):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT) :])
    stages = [line[len(_STAGE) :] for line in lines if line.startswith(_STAGE)]
    stage = stages[-1] if stages else "start"
    if timed_out:
        error = f"{stage}: timed out after {timeout:.0f} s"
    else:
        tail = " ".join((stderr.strip().splitlines() or [""])[-1].split())[:300]
        error = f"{stage}: process exited with {proc.returncode}: {tail}"
    return {"seconds": None, "setup_s": None, "error": error}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(base: list, new: list) -> float | None:
    """Median over rounds of ``base / new`` (seconds), rounds where either failed left out."""
    pairs = [(b, n) for b, n in zip(base, new) if b is not None and n is not None]
    return paired_speedup([b for b, _ in pairs], [n for _, n in pairs]) if pairs else None


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


def make_rows(results: dict[tuple, list[dict]], env: dict[str, str]) -> list[dict]:
    """One row per configuration from its rounds' results, with the ratios between configurations."""
    rows = []
    for (impl, runtime, batch, size), rounds in results.items():
        seconds = [r["seconds"] for r in rounds]
        vig = [r["seconds"] for r in results.get(("vig_pyg", runtime, batch, size), [])]
        # A training step against an eval forward is no runtime's speed-up: no vs_eager for train.
        eager_key = (impl, "eager", batch, size) if runtime != "train" else None
        eager = [r["seconds"] for r in results.get(eager_key, [])]
        median = _median(seconds)
        errors = list(dict.fromkeys(r["error"] for r in rounds if r["error"]))
        rows.append(
            {
                "model": MODELS[impl],
                "impl": impl,
                "runtime": runtime,
                "batch": batch,
                "size": size,
                "dtype": "float32",
                "img_per_s": _round(None if median is None else batch / median, 2),
                # vig_pyg's speed over this row's: this row's seconds over vig_pyg's, round by round.
                "vig_pyg_ratio": _round(_ratio(seconds, vig), 2),
                "vs_eager": _round(_ratio(eager, seconds), 2),
                "setup_s": _round(_median([r["setup_s"] for r in rounds]), 1),
                "graph_breaks": _first(rounds, "graph_breaks"),
                "graphs": _first(rounds, "graphs"),
                "max_rel_err": _format_err(_median([r.get("max_rel_err") for r in rounds])),
                "params_m": _first(rounds, "params_m"),
                "rounds": sum(s is not None for s in seconds),
                "error": " / ".join(errors),
                "notes": _first(rounds, "notes"),
                **env,
            }
        )
    return rows


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` with the rows of the CSV at ``path`` (if any) that none of them replaces (see ``ROW_KEY``).

    A replaced row's place is kept; new rows come after the existing ones. Columns missing from either side
    are left empty, the new rows' columns first.
    """
    if not path.exists():
        return rows
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        existing = list(reader)
        old_fields = list(reader.fieldnames or [])
    fields = list(dict.fromkeys([*rows[0], *old_fields]))
    new = {tuple(str(row[k]) for k in ROW_KEY): row for row in rows}
    merged = []
    for row in existing:
        key = tuple(row.get(k, "") for k in ROW_KEY)
        merged.append(new.pop(key) if key in new else row)
    merged.extend(new.values())
    return [{field: row.get(field, "") for field in fields} for row in merged]


def _first(rounds: list[dict], key: str) -> object:
    return next((r[key] for r in rounds if r.get(key) is not None), "")


def _format_err(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def _kernels() -> str:
    """Whether vig_pyg's compiled CPU kernels load (as benchmarks.models records it)."""
    try:
        from vig_pyg import kernels
    except Exception as err:  # vig_pyg does not import: its rows will say why
        return f"unknown ({type(err).__name__})"
    return "on" if kernels.available() else "off"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impls", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--runtimes", nargs="+", choices=RUNTIMES, default=list(DEFAULT_RUNTIMES),
        help="default: eager compile onnx (train only when named)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None,
        help="default 8 (with --quick 1, or 2 with train: BatchNorm cannot train on one image)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, nargs="+", default=[224])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per process (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="sweeps, each process in turn (see above)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one process may take")
    parser.add_argument("--quick", action="store_true", help="smoke check: batch 1 (2), 1 warm-up, 3 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers_cpu.csv")
    args = parser.parse_args(argv)
    batches = args.batch or ([2 if "train" in args.runtimes else 1] if args.quick else [8])
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    torch.set_num_threads(args.threads)  # so that environment() records it
    env = {
        "kernels": _kernels(),
        **environment(),
        "timm": _version("timm"),
        "onnxruntime": _version("onnxruntime"),
    }
    configs = [
        (impl, runtime, batch, size)
        for runtime in args.runtimes
        for batch in batches
        for size in args.size
        for impl in args.impls
    ]
    results: dict[tuple, list[dict]] = {config: [] for config in configs}
    start = time.perf_counter()
    for round_ in range(args.rounds):
        for impl, runtime, batch, size in configs:
            config = dict(impl=impl, runtime=runtime, batch=batch, size=size, threads=args.threads,
                          warmup=warmup, repeats=repeats)  # fmt: skip
            t0 = time.perf_counter()
            result = spawn(config, args.timeout)
            results[(impl, runtime, batch, size)].append(result)
            speed = f"{batch / result['seconds']:.2f} img/s" if result["seconds"] else "failed"
            print(
                f"[round {round_ + 1}/{args.rounds}, {time.perf_counter() - t0:.0f} s] {impl} {runtime} "
                f"batch={batch} size={size}: {speed} {result['error']}".rstrip(),
                flush=True,
            )
    rows = merge_rows(args.out, make_rows(results, env))
    write_csv(args.out, rows)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
