"""Tracing and export: ``torch.fx`` with ViG's leaf modules, and ONNX.

``torch.compile`` and ``torch.export.export`` work on vig_pyg models as they are. ``torch.fx`` symbolic
tracing cannot follow a Grapher (it sizes its graph from the input's shape), so :func:`symbolic_trace`
keeps each Grapher and FFN as one call (leaf modules, named after their module path), as well as every
conv + norm layer; activations, the position embedding, pooling and the head are traced op by op, and
FX-based tools (feature extraction by node name) work on the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import fx, nn

from vig_pyg import ops
from vig_pyg.files import atomic_path
from vig_pyg.graph.builders import GraphBuilder, GridKNNGraph
from vig_pyg.layers.blocks import FFN, Grapher
from vig_pyg.layers.common import ConvNorm, DropPath, HeadBatchNorm

__all__ = ["FX_LEAF_MODULES", "ViGTracer", "create_feature_extractor", "export_onnx", "symbolic_trace"]

#: Modules that FX keeps as single calls: Graphers and their graph builders need concrete shapes,
#: DropPath the input's rank, ConvNorm its output's size (it applies an eval BatchNorm where that is
#: cheaper), and an FFN as one call gives every block's output a node named after it
#: (``stages_1_blocks_0_ffn``), which feature extraction by name relies on; the head's HeadBatchNorm
#: chooses by batch size (a batch of one image).
FX_LEAF_MODULES: tuple[type[nn.Module], ...] = (Grapher, GraphBuilder, FFN, DropPath, ConvNorm, HeadBatchNorm)


class ViGTracer(fx.Tracer):
    """An FX tracer that treats :data:`FX_LEAF_MODULES` (and torch's own layers) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FX_LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` for ViG models, Graphers kept as leaf calls. Trace in the mode you run."""
    graph = ViGTracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def create_feature_extractor(model: nn.Module, return_nodes: Sequence[str]) -> fx.GraphModule:
    """A traced copy of ``model`` whose forward returns ``{name: tensor}`` for the named FX nodes.

    Node names are those of :func:`symbolic_trace`'s graph (``[n.name for n in gm.graph.nodes]``).
    """
    gm = symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    unknown = [name for name in return_nodes if name not in nodes]
    if unknown:
        raise ValueError(
            f"no FX node named {unknown}; list them with [n.name for n in symbolic_trace(m).graph.nodes]"
        )
    for n in list(gm.graph.nodes):
        if n.op == "output":
            gm.graph.erase_node(n)
    gm.graph.output({name: nodes[name] for name in return_nodes})
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int] = (3, 224, 224),
    batch_size: int = 2,
    dynamic_batch: bool = True,
    opset: int = 18,
) -> Path:
    """Write ``model`` (in eval mode) as ONNX, with a dynamic batch axis by default.

    Uses torch's ``torch.export``-based ONNX exporter (needs the ``onnx`` and ``onnxscript`` packages).
    The kNN search must be the dense back-end: the torch_cluster op has no ONNX counterpart, so models
    built with ``knn_method="torch_cluster"`` are refused with a clear error.

    Returns:
        The path written.
    """
    for m in model.modules():
        if isinstance(m, GraphBuilder) and not m.regular:
            raise ValueError(
                f"ONNX export of a ragged graph ({type(m).__name__}: a data-dependent edge count) is not "
                "supported yet; torch.export.export(model, (x,)) captures it, or export a model built with a "
                "k-regular builder (graph='knn', 'grid' or 'random')"
            )
        if isinstance(m, GridKNNGraph) and m.method == "torch_cluster":
            raise ValueError(
                "ONNX has no counterpart of the torch_cluster kNN op; build the model with "
                "knn_method='dense' (or 'auto') to export it"
            )
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript"
        ) from err
    path = Path(path)
    model = model.eval()
    # The example input only fixes shapes; a generator of its own leaves the caller's RNG state alone.
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    # vig_pyg's operators (vig_pyg.ops) have no ONNX counterpart: exported, they are turned back into
    # their PyTorch implementations, which the ONNX exporter knows.
    exported = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    table = torch.export.default_decompositions()
    table.update(ops.decompositions())
    exported = exported.run_decompositions(table)
    program = torch.onnx.export(
        exported, (x,), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"],
        verbose=False,
    )  # fmt: skip
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return path
