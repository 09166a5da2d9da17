"""Whether code runs eagerly or is being captured (``torch.compile``, ``torch.export``, FX).

Some eager-only speed-ups (caches keyed on Python values, loops over row blocks whose count depends on
a size) would bake constants into a captured graph or unroll into it; captured code takes the plain
path instead, which the compiler fuses on its own.
"""

from __future__ import annotations

import torch

__all__ = ["is_tracing"]


def is_tracing() -> bool:
    """``True`` inside ``torch.compile``, ``torch.export`` and ``torch.fx.symbolic_trace``."""
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
