"""Optional compiled CPU kernels, built on the user's machine against the installed torch.

Two steps of a ViG block are faster written as plain loops than as PyTorch ops on CPU, and are the CPU
kernels of vig_pyg's operators (:mod:`vig_pyg.ops`) where they are built:

* ``torch.ops.vig_pyg_cpu.small_topk`` (``csrc/select.cpp``): the dense kNN's top-k for small ``k``
  (operator ``vig_pyg::knn_topk``);
* ``torch.ops.vig_pyg_cpu.neighbor_max`` and ``max_relative`` (``csrc/aggregate.cpp``): the max over each
  node's neighbours, reduced without materialising the ``(N, k, C)`` neighbour tensor, and MR's interleaved
  ``[x, max - x]`` input written in the same pass (operators ``vig_pyg::neighbor_max``, ``max_relative``).

``vig-pyg kernels --build`` (which ``make`` runs) compiles them into one library in
``~/.cache/vig_pyg/ops/torch-<version>/`` (``VIG_PYG_OPS_DIR`` overrides the root), keyed by a hash of the
sources so that an edited kernel is never confused with an old build. It needs a C++ compiler and ninja
(the ``kernels`` extra). Without the library (or with ``VIG_PYG_NO_KERNELS=1`` in the environment) the
operators' CPU kernels are their PyTorch implementations: results are the same either way (see
:mod:`vig_pyg.ops.select` for the one documented difference, the order of tied scores).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["available", "build", "library_path"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "select.cpp", _CSRC / "aggregate.cpp")
_HEADERS = (_CSRC / "vectorize.h",)
_OPS = ("small_topk", "neighbor_max", "max_relative")  # in torch.ops.vig_pyg_cpu
log = logging.getLogger(__name__)
_loaded: bool | None = None  # None: not looked for yet


def _library_name() -> str:
    # Keyed by the sources and headers, so that an edited kernel is never confused with an old build.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)).hexdigest()[:12]
    return f"vig_pyg_ops_{digest}"


def _build_dir() -> Path:
    root = Path(os.environ.get("VIG_PYG_OPS_DIR", Path.home() / ".cache" / "vig_pyg" / "ops"))
    return root / f"torch-{torch.__version__}"


def library_path() -> Path:
    """Where the library for these sources and the installed torch is (or would be) kept."""
    return _build_dir() / f"{_library_name()}.so"


def available() -> bool:
    """Whether the compiled kernels are loaded (loading them on first call if they were built).

    ``VIG_PYG_NO_KERNELS=1`` in the environment keeps them unloaded, for a whole process and the
    processes it starts.
    """
    global _loaded
    if _loaded is None and os.environ.get("VIG_PYG_NO_KERNELS", "") not in ("", "0"):
        _loaded = False
    if _loaded is None:
        _loaded = all(hasattr(torch.ops.vig_pyg_cpu, op) for op in _OPS)
        path = library_path()
        if not _loaded and path.exists():
            try:
                torch.ops.load_library(str(path))
                _loaded = True
            except OSError:  # built for another torch or machine: the PyTorch paths are used
                _loaded = False
    return _loaded


@contextlib.contextmanager
def _exclusive_build(directory: Path, poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``directory/build.lock`` for a build, saying what is waited for while another build holds it.

    The lock is a ``flock``, which the system releases when its holder dies, so a killed build never
    blocks the next one. ``torch.utils.cpp_extension`` keeps a lock file of its own (``lock``) that a
    killed build leaves behind and that makes every later build wait forever: holding ``build.lock``,
    any such file is stale and is removed.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds are not protected from each other
        yield
        return
    path = directory / "build.lock"
    with open(path, "a+") as f:
        since = time.monotonic()
        said = -1
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = int(time.monotonic() - since)
                if said < 0 or waited - said >= 30:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    log.info("waiting for another build of the kernels to finish (%s holds %s)", holder, path)
                    said = waited
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        baton = directory / "lock"
        if baton.exists():
            log.info("removing %s, left by an interrupted build", baton)
            baton.unlink(missing_ok=True)
        yield


def build(verbose: bool = False) -> Path:
    """Compile the kernels for the installed torch (about 20 s) and load them; returns the library path.

    Only loads them when these sources were already built. Waits (and logs what it waits for) while
    another process builds them. Raises what ``torch.utils.cpp_extension`` raises when no compiler or
    ninja is found.
    """
    global _loaded
    if available():
        return library_path()
    from torch.utils import cpp_extension

    directory = _build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(directory):
        cpp_extension.load(
            name=_library_name(),
            sources=[str(path) for path in _SOURCES],
            build_directory=str(directory),
            extra_cflags=["-O3", "-fopenmp"],  # OpenMP: at::parallel_for splits rows over torch's threads
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
    _loaded = True
    from vig_pyg import ops  # the operators' CPU kernels switch to the library

    ops.register_cpu_kernels()
    return library_path()
