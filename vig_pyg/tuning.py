"""Which GEMM a pointwise (1x1) layer runs on this machine, chosen by measurement once.

Every fc layer of a ViG model is one matrix product over the nodes of a channels-last feature map,
and PyTorch's CPU build runs it two ways: ``F.linear`` on the free ``(B, H, W, C)`` view (MKL's sgemm)
or a 1x1 ``F.conv2d`` (oneDNN). Which is faster depends on the processor and the shape: on an AMD Zen 5
the convolution ran at 1.9x-2.3x the speed of ``F.linear`` at Pyramid ViG-S's shapes; on an Intel Xeon
it was 1.1x-1.4x faster in the early, narrow layers and 0.8x-0.9x as fast as ``F.linear`` for the late,
wide layers' forward and backward (``python -m benchmarks.gemm``). So no fixed choice is right.

:func:`best_gemm` times both kernels for one shape, once per machine: the result is kept in memory and
in a small JSON file keyed by CPU model, torch version and thread count (under ``~/.cache/vig_pyg/tuning``;
``VIG_PYG_TUNING_DIR`` moves it), so that later processes take the same kernels and compute the same
numbers. Eval (forward) and training (forward and backward) are chosen separately. The models resolve
``gemm="auto"`` with it when they are built (:func:`set_gemm`); the choice is part of each layer's
``repr``, and ``gemm="linear"`` or ``"conv"`` fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEMMS", "GemmChoice", "best_gemm", "cpu_model", "measure_gemm", "set_gemm", "tuning_file"]

#: The two ways to run a pointwise layer.
GEMMS = ("linear", "conv")

#: Images per batch assumed when a model is tuned (the rows of a layer are batch x its grid's nodes).
NOMINAL_BATCH = 8

# Below this, a kernel counts as faster only if it wins by more than 3%: near ties keep the convolution,
# which was the faster or the equal kernel on both processors measured, so that noise does not flip it.
_TIE = 0.97


class GemmChoice(NamedTuple):
    """The kernel a pointwise layer runs in eval mode and in training."""

    eval: str = "linear"
    train: str = "linear"

    def __str__(self) -> str:
        return self.eval if self.eval == self.train else f"{self.eval} (eval), {self.train} (train)"


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tuning_file() -> Path:
    """This machine's file of measured choices (CPU model, torch version and threads in its name)."""
    root = Path(os.environ.get("VIG_PYG_TUNING_DIR", Path.home() / ".cache" / "vig_pyg" / "tuning"))
    key = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()}"
    return root / f"gemm-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


_choices: dict[Path, dict[str, GemmChoice]] = {}


def _table(path: Path) -> dict[str, GemmChoice]:
    if path not in _choices:
        table: dict[str, GemmChoice] = {}
        try:
            stored = json.loads(path.read_text())
            table = {
                key: GemmChoice(*value)
                for key, value in stored["choices"].items()
                if len(value) == 2 and all(v in GEMMS for v in value)
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no file yet, or one this version cannot read: measure again
        _choices[path] = table
    return _choices[path]


def _save(path: Path, table: dict[str, GemmChoice]) -> None:
    from vig_pyg.files import atomic_write

    body = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    body["choices"] = {key: list(choice) for key, choice in sorted(table.items())}
    text = json.dumps(body, indent=1).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text))
    except (OSError, ValueError):
        pass  # a read-only cache only costs a measurement in the next process


def _kernels(rows: int, cin: int, cout: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    weight = torch.empty(cout, cin, 1, 1).normal_(generator=torch.Generator().manual_seed(0))
    weight = weight.requires_grad_()

    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1))

    def conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight)

    return {"linear": linear, "conv": conv}


def measure_gemm(rows: int, cin: int, cout: int, repeats: int = 5) -> dict[str, tuple[float, float]]:
    """Median seconds of each kernel on ``(rows, cin) -> (rows, cout)``: forward alone, and forward with
    backward (input and weight gradients). Kernels are timed in turn, so that drift hits both alike."""
    generator = torch.Generator().manual_seed(0)  # the global random state is left as it was
    x = torch.empty(1, rows, 1, cin).normal_(generator=generator).permute(0, 3, 1, 2)  # channels last
    x_train = x.detach().requires_grad_()
    kernels = _kernels(rows, cin, cout)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in kernels}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, fn in kernels.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(x)
                t1 = time.perf_counter()
            out = fn(x_train)
            out.backward(torch.ones_like(out))
            t2 = time.perf_counter()
            if round_:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {name: (statistics.median(f), statistics.median(s)) for name, (f, s) in times.items()}


def _pick(linear_s: float, conv_s: float) -> str:
    return "linear" if linear_s < _TIE * conv_s else "conv"


def best_gemm(rows: int, cin: int, cout: int) -> GemmChoice:
    """The faster kernel for eval and for training at this shape on this machine (measured on first
    use, then read from memory or from :func:`tuning_file`)."""
    path = tuning_file()
    table = _table(path)
    key = f"{rows}x{cin}x{cout}"
    if key not in table:
        times = measure_gemm(rows, cin, cout)
        (lin_f, lin_s), (conv_f, conv_s) = times["linear"], times["conv"]
        table[key] = GemmChoice(_pick(lin_f, conv_f), _pick(lin_s, conv_s))
        _save(path, table)
    return table[key]


def set_gemm(model: nn.Module, gemm: str = "auto", input_size: tuple[int, int] | None = None) -> nn.Module:
    """Set the kernel of every pointwise :class:`vig_pyg.layers.ConvNorm` in ``model``.

    Args:
        gemm: ``"linear"`` or ``"conv"`` for every layer, or ``"auto"``: each layer the faster one at its
            own shape on this machine (:func:`best_gemm`), for a batch of :data:`NOMINAL_BATCH` images of
            ``input_size``.
        input_size: ``(height, width)`` of the images; default ``model.img_size``. ``"auto"`` runs one
            batch of one such image through the model (no gradient, state unchanged) to find every
            layer's grid.

    Returns:
        ``model``. Numbers differ between the kernels by float rounding only.
    """
    from vig_pyg.layers.common import ConvNorm

    if gemm not in (*GEMMS, "auto"):
        raise ValueError(f"gemm must be 'auto', 'linear' or 'conv', got {gemm!r}")
    layers = [m for m in model.modules() if isinstance(m, ConvNorm) and m.pointwise]
    if gemm != "auto":
        for layer in layers:
            layer.gemm = GemmChoice(gemm, gemm)
        return model
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":  # nothing to run on: keep the layers' kernels
        return model
    size = input_size if input_size is not None else getattr(model, "img_size", None)
    if size is None:
        raise ValueError("gemm='auto' needs the input size: pass input_size=(height, width)")
    grids: dict[ConvNorm, tuple[int, int]] = {}

    def record_grid(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        grids.setdefault(layer, tuple(args[0].shape[-2:]))

    hooks = [layer.register_forward_pre_hook(record_grid) for layer in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(
                torch.zeros(1, getattr(model, "in_chans", 3), *size, dtype=first.dtype, device=first.device)
            )
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    for layer, (h, w) in grids.items():
        layer.gemm = best_gemm(NOMINAL_BATCH * h * w, layer.conv.in_channels, layer.conv.out_channels)
    return model
