"""vig_pyg's fused operators, registered with ``torch.library``.

Every speed-up of a ViG layer lives here as an operator, not as a branch in the model code: the layers
call ``torch.ops.vig_pyg.*`` (through the functions below) in eager mode, under ``torch.compile`` and in
``torch.export``, and the dispatcher picks the implementation:

* ``knn_topk`` (:mod:`.select`): the dense kNN's top-k selection;
* ``neighbor_max``, ``max_relative`` (:mod:`.aggregate`): the max over every node's ``k`` neighbours, and
  MRConv's interleaved ``[x, max - x]`` input, with the winners' positions and an autograd formula that
  keeps only them;
* ``masked_edges`` (:mod:`.ragged`): a ragged edge list from a neighbour table and a keep mask, with a
  data-dependent edge count (a radius graph);
* ``norm_act_linear``, ``norm_act_conv`` (:mod:`.norm_act`): BatchNorm, activation and the next layer as
  one step whose backward keeps only its input (training memory; PyTorch's implementation only).

Each has a PyTorch implementation (any device and dtype), a fake kernel (shapes for ``torch.compile`` and
``torch.export``) and, on CPU, a kernel chosen once, when this package is imported or the compiled kernels
are built (:func:`register_cpu_kernels`): the compiled C++ kernels of :mod:`vig_pyg.kernels` where they are
built, else PyTorch's reduction in cache-sized blocks. ONNX has no such operators: :func:`decompositions`
turns them back into their PyTorch implementations for export (:func:`vig_pyg.export.export_onnx`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from vig_pyg import kernels
from vig_pyg.ops import aggregate, ragged, select
from vig_pyg.ops.aggregate import MAX_K_POSITIONS, max_relative, neighbor_max
from vig_pyg.ops.norm_act import norm_act_conv, norm_act_linear
from vig_pyg.ops.ragged import masked_edges
from vig_pyg.ops.select import KERNEL_MAX_K, knn_topk

__all__ = [
    "KERNEL_MAX_K",
    "MAX_K_POSITIONS",
    "cpu_kernels",
    "decompositions",
    "knn_topk",
    "masked_edges",
    "max_relative",
    "neighbor_max",
    "norm_act_conv",
    "norm_act_linear",
    "pytorch_kernels",
    "register_cpu_kernels",
]

_cpu_kernels = "none"


def register_cpu_kernels(compiled: bool | None = None) -> str:
    """Register the CPU kernels of every operator: the compiled ones when :func:`vig_pyg.kernels.available`
    (or ``compiled`` says so), else the PyTorch ones. Returns which (``"compiled"`` or ``"pytorch"``);
    called at import and by :func:`vig_pyg.kernels.build`."""
    global _cpu_kernels
    if compiled is None:
        compiled = kernels.available()
    if compiled:
        knn_topk.register_kernel("cpu")(select.compiled_knn_topk)
        neighbor_max.register_kernel("cpu")(aggregate.compiled_neighbor_max)
        max_relative.register_kernel("cpu")(aggregate.compiled_max_relative)
        _cpu_kernels = "compiled"
    else:
        knn_topk.register_kernel("cpu")(select.reference_knn_topk)
        neighbor_max.register_kernel("cpu")(aggregate.blocked_neighbor_max)
        max_relative.register_kernel("cpu")(aggregate.blocked_max_relative)
        _cpu_kernels = "pytorch"
    return _cpu_kernels


@contextlib.contextmanager
def pytorch_kernels() -> Iterator[None]:
    """Dispatch every operator to its PyTorch CPU kernel inside this block: to compare with the compiled
    kernels, or to debug. Not thread-safe (it re-registers the kernels); the only switch there is."""
    previous = _cpu_kernels
    register_cpu_kernels(compiled=False)
    try:
        yield
    finally:
        register_cpu_kernels(compiled=previous == "compiled")


def cpu_kernels() -> str:
    """Which CPU kernels the operators dispatch to: ``"compiled"`` or ``"pytorch"``."""
    return _cpu_kernels


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The operators' PyTorch implementations, for ``ExportedProgram.run_decompositions`` (ONNX export)."""
    return {
        torch.ops.vig_pyg.knn_topk.default: select.reference_knn_topk,
        torch.ops.vig_pyg.neighbor_max.default: aggregate.reference_neighbor_max,
        torch.ops.vig_pyg.max_relative.default: aggregate.reference_max_relative,
        torch.ops.vig_pyg.masked_edges.default: ragged.masked_edges_reference,
    }


register_cpu_kernels()
