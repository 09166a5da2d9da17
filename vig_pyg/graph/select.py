"""Exact top-k selection for the dense kNN search, with an optional compiled CPU kernel.

The selection after the score matmul is the slowest step of the dense search on CPU: ``torch.topk`` runs
a general selection over every score (about 7 ns per score at ViG's sizes, 12-16% of Pyramid ViG's eval
time). ``vig_pyg/csrc/select.cpp`` selects ViG's small ``k`` by scanning each row once against the best
``k`` so far (2.4x faster for Pyramid ViG's first two stages at 224, 1.4x at 448, 1.1x-1.5x for the
``k * d`` of 18 to 45 of later stages; ``benchmarks/graph.py``). It is compiled
on the user's machine against the installed torch (``vig-pyg kernels --build``, which ``make`` runs;
it needs a C++ compiler and ninja) and kept in ``~/.cache/vig_pyg/ops``. Without it, or on
GPU, in float16/bfloat16, for ``k > 64``, or while ``torch.compile``/``torch.export`` capture the model,
:func:`topk_indices` is ``torch.topk``: the results are the same either way (up to the order of exactly
equal scores, which ``torch.topk`` leaves unspecified).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

from vig_pyg.tracing import is_tracing

__all__ = ["build_kernel", "kernel_available", "topk_indices"]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "select.cpp"
# Beyond this k the kernel's selection has no edge over torch.topk (measured up to k = 45 of 196).
KERNEL_MAX_K = 64
_loaded: bool | None = None  # None: not looked for yet


def _library_name() -> str:
    # Keyed by the source, so that an edited kernel is never confused with an old build.
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    return f"vig_pyg_select_{digest}"


def _build_dir() -> Path:
    root = Path(os.environ.get("VIG_PYG_OPS_DIR", Path.home() / ".cache" / "vig_pyg" / "ops"))
    return root / f"torch-{torch.__version__}"


def _library_path() -> Path:
    return _build_dir() / f"{_library_name()}.so"


def kernel_available() -> bool:
    """Whether the compiled selection kernel is loaded (loading it on first call if it was built)."""
    global _loaded
    if _loaded is None:
        _loaded = hasattr(torch.ops.vig_pyg, "small_topk")
        path = _library_path()
        if not _loaded and path.exists():
            try:
                torch.ops.load_library(str(path))
                _loaded = True
            except OSError:  # built for another torch or machine: fall back to torch.topk
                _loaded = False
    return _loaded


def build_kernel(verbose: bool = False) -> Path:
    """Compile the selection kernel for the installed torch (about 15 s) and load it; returns its path.

    Does nothing more than load it when this source was already built. Raises what
    ``torch.utils.cpp_extension`` raises when no compiler or ninja is found.
    """
    global _loaded
    if kernel_available():
        return _library_path()
    from torch.utils import cpp_extension

    directory = _build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_library_name(),
        sources=[str(_SOURCE)],
        build_directory=str(directory),
        extra_cflags=["-O3", "-fopenmp"],  # OpenMP: at::parallel_for splits rows over torch's threads
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    _loaded = True
    return _library_path()


def topk_indices(score: Tensor, k: int) -> Tensor:
    """``torch.topk(score, k, dim=-1).indices`` (largest first), by the compiled kernel where it applies."""
    if (
        k <= KERNEL_MAX_K
        and score.device.type == "cpu"
        and score.dtype in (torch.float32, torch.float64)
        and not score.requires_grad
        and not is_tracing()
        and kernel_available()
    ):
        return torch.ops.vig_pyg.small_topk(score, k)
    return torch.topk(score, k, dim=-1).indices
