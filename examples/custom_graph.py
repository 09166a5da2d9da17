"""Write your own graph builder: each patch joined to the patches of its own image row most like it.

A graph builder is a module ``forward(nodes, grid) -> Graph``. Registered by name, it is chosen like a conv
(``create_model(..., graph="row_knn")``, ``vig-pyg train --graph row_knn``), saved with the run and rebuilt
on reload. This script trains ``pvig_test`` with it on the embedded digits, reloads the checkpoint (which
rebuilds the builder by its name), compiles the reloaded model and draws its graphs.

    python examples/custom_graph.py --quick      # a few steps: a smoke run
    python examples/custom_graph.py --epochs 4   # enough for the rows' neighbours to follow the strokes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from vig_pyg.graph import Graph, GraphBuilder, PatchGrid, register_graph


class RowKNNGraph(GraphBuilder):
    """Every patch joined to the ``k`` patches of its own image row nearest to it in feature space."""

    regular = True  # k edges per node: the convs' fast path

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k

    def forward(self, nodes: torch.Tensor, grid: PatchGrid) -> Graph:
        rows, width = grid.batch_size * grid.height, grid.width
        k = min(self.k, width)  # the last stage's rows are 3 patches wide
        with torch.no_grad():
            x = F.normalize(nodes, dim=-1).view(rows, width, -1)  # (rows, W, C)
            local = (x @ x.transpose(1, 2)).topk(k, dim=-1).indices  # (rows, W, k), nearest first
            first = torch.arange(rows, device=nodes.device).view(-1, 1, 1) * width  # each row's first node
        return Graph.from_neighbors((local + first).view(-1, k))  # k-regular by construction


register_graph("row_knn", RowKNNGraph)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 training steps on 64 images")
    p.add_argument("--out", help="run folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on a shared CPU

    from vig_pyg.data import load_digits_split
    from vig_pyg.data.transforms import batch_transform
    from vig_pyg.train import TrainConfig, load_model, train
    from vig_pyg.viz import visualize_graph

    out = Path(args.out or tempfile.mkdtemp(prefix="custom_graph_"))
    limits = {"limit_train": 64, "limit_val": 32, "batch_size": 16} if args.quick else {}
    config = TrainConfig(
        model_kwargs={"graph": "row_knn", "k": 3}, out_dir=str(out), epochs=1 if args.quick else args.epochs,
        overwrite=True, progress=False, **limits,
    )  # fmt: skip
    result = train(config)
    model, info = load_model(result.best_checkpoint)  # rebuilt with graph="row_knn" from the checkpoint
    print(f"trained {result.epochs_done} epoch(s): val top-1 {result.best_top1:.1f}%")
    print(f"reloaded: first block's graph {model.graphers()[0].graph}")

    _, val = load_digits_split(info.preprocessing.size, val_fraction=0.2, seed=0)
    images = torch.stack([val[i][0] for i in range(4)])
    x = batch_transform(info.preprocessing)(images)
    model.eval()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    gap = float((compiled - eager).abs().max() / eager.abs().max())
    # Rounding differs between the two, and may decide a near-tie between two neighbours.
    print(f"torch.compile(fullgraph=True) vs eager: largest difference {gap:.1e} of the largest logit")

    picture = visualize_graph(model, val[0][0], info.preprocessing, ((0.5, 0.5), (0.1, 0.1)), panel_size=200)
    picture.save(out / "row_graph.png")
    print(f"graph picture: {out / 'row_graph.png'}")
    return {"top1": result.best_top1, "compile_gap": gap}


if __name__ == "__main__":
    main()
