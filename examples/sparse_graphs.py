"""Sparse, ragged patch graphs: what PyG's node-list layout allows and a dense ``(B, C, N)`` layout does not.

Dense ViG code stores a batch as one ``(B, C, H, W)`` tensor, so every image must keep all of its patches
and have the same size. In vig_pyg a batch is a list of nodes with a ``batch`` vector, so:

1. each image can keep a different random subset of its patches (masked-image-style token dropping): the
   graphs are ragged, ``knn_graph(..., batch=...)`` still joins nodes only within their own image, and the
   dense and torch_cluster back-ends give the same neighbours;
2. images of different sizes go into one batch (``images_to_batch(list)``), through kNN and a graph conv,
   and back to their own shapes (``batch_to_images``).

    python examples/sparse_graphs.py --quick
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from vig_pyg.graph import Graph, batch_to_images, images_to_batch, knn_graph
from vig_pyg.nn import MRConv


def neighbour_sets(edge_index: Tensor, num_nodes: int, k: int) -> Tensor:
    """``(N, k)`` neighbours of each centre, sorted, so that two back-ends' graphs can be compared."""
    order = edge_index[1].argsort(stable=True)
    return edge_index[0, order].view(num_nodes, k).sort(dim=1).values


def cross_edges(edge_index: Tensor, batch: Tensor) -> int:
    """Edges whose two ends lie in different images (must be 0)."""
    return int((batch[edge_index[0]] != batch[edge_index[1]]).sum())


def drop_patches(feats: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Keep a random 30-70 % of each image's patches; return the kept nodes and their ``batch`` vector."""
    b, _, h, w = feats.shape
    nodes = images_to_batch(feats)
    kept, batch = [], []
    for i in range(b):
        n_keep = int(torch.randint(int(0.3 * h * w), int(0.7 * h * w), (1,), generator=generator))
        idx = torch.randperm(h * w, generator=generator)[:n_keep].sort().values  # different patches per image
        kept.append(nodes.x[nodes.ptr[i] + idx])
        batch.append(torch.full((n_keep,), i))
    return torch.cat(kept), torch.cat(batch)


def main(argv: list[str] | None = None) -> None:
    """Run the two ragged-graph experiments and print what they show."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--size", type=int, default=28, help="feature-map side of the token-dropping experiment")
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="small feature maps: about a second")
    args = p.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # a smoke run: do not oversubscribe a shared CPU
        args.size, args.channels = 12, 16
    g = torch.Generator().manual_seed(0)
    k, c = args.k, args.channels
    conv = MRConv(c, 2 * c).eval()  # eval: BatchNorm uses its running statistics, batch-independent

    print(f"1. token dropping: 3 maps of {c}x{args.size}x{args.size}, each keeps its own random patches")
    x, batch = drop_patches(torch.randn(3, c, args.size, args.size, generator=g), g)
    counts = torch.bincount(batch).tolist()
    print(f"   nodes per graph: {counts} (of {args.size * args.size} each)")
    dense = knn_graph(x, k, batch, method="dense")
    cluster = knn_graph(x, k, batch, method="torch_cluster")
    agree = torch.equal(neighbour_sets(dense, len(x), k), neighbour_sets(cluster, len(x), k))
    print(f"   kNN back-ends agree (dense vs torch_cluster): {agree}")
    print(f"   edges: {dense.size(1)} = {len(x)} nodes x k={k}")
    print(f"   cross-image edges: {cross_edges(dense, batch)}")
    with torch.no_grad():
        out_fast = conv(x, Graph.k_regular(dense, k))  # k-regular: the gather fast path
        out_pyg = conv(x, dense)  # a plain edge_index: PyG's scatter aggregation, as for any sparse graph
    same = torch.allclose(out_fast, out_pyg, atol=1e-5)
    print(f"   MRConv out {tuple(out_fast.shape)}; k-regular fast path == PyG aggregation: {same}")

    sizes = [(10, 10), (12, 16), (7, 9)] if args.quick else [(14, 14), (20, 28), (9, 13)]
    print(f"2. mixed sizes in one batch: feature maps {sizes}")
    images = [torch.randn(c, h, w, generator=g) for h, w in sizes]
    data = images_to_batch(images)
    print(f"   nodes per graph: {torch.bincount(data.batch).tolist()}")
    edge_index = knn_graph(data.x, k, data.batch)
    print(f"   cross-image edges: {cross_edges(edge_index, data.batch)}")
    with torch.no_grad():
        data.x = conv(data.x, Graph.k_regular(edge_index, k))
    outs = batch_to_images(data)
    print(f"   back to images: {[tuple(o.shape) for o in outs]}")


if __name__ == "__main__":
    main()
