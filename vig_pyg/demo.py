"""``make demo``: one image through the whole graph layer and a ViG backbone, printing each step."""

from __future__ import annotations

import argparse
import time

import torch

import vig_pyg
from vig_pyg.graph import batch_to_images, images_to_batch, knn_graph, relative_position_factors
from vig_pyg.nn import MRConv


def _synthetic_images(batch: int, size: int) -> torch.Tensor:
    """Smooth blobs plus noise, so that feature-space neighbours are not random."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(batch):
        cx, cy = torch.rand(2, generator=g) * 1.2 - 0.6
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.1)
        colour = torch.rand(3, 1, 1, generator=g)
        imgs.append(colour * blob + 0.05 * torch.randn(3, size, size, generator=g))
    return torch.stack(imgs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="pvig_s_224_gelu", help="model for the last step")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print("1. images as graphs")
    feats = _synthetic_images(2, 56)  # a (B, C, H, W) feature map: 2 images of 56x56 "patches"
    batch = images_to_batch(feats)
    exact = torch.equal(batch_to_images(batch), feats)
    print(f"   (B, C, H, W) = {tuple(feats.shape)} -> Batch with x {tuple(batch.x.shape)}, "
          f"pos {tuple(batch.pos.shape)}, {batch.num_graphs} graphs; round trip exact: {exact}")  # fmt: skip
    ragged = images_to_batch([feats[0, :, :28, :28], feats[1, :, :14, :42]])
    print(
        f"   ragged: grids of 28x28 and 14x42 -> {ragged.num_nodes} nodes, sizes {ragged.grid_size.tolist()}"
    )

    print("2. kNN graph in feature space (k=9, dilation 2, Pyramid ViG's relative-position term)")
    x = torch.randn(2 * 196, 48)
    b = torch.arange(2).repeat_interleave(196)
    bias = relative_position_factors(48, 14, 14)
    for method in ("dense", "torch_cluster"):
        t0 = time.perf_counter()
        ei = knn_graph(x, 9, b, dilation=2, bias=bias, method=method)
        dt = (time.perf_counter() - t0) * 1e3
        print(f"   {method:>13}: edge_index {tuple(ei.shape)} in {dt:6.1f} ms; cross-image edges: "
              f"{int((b[ei[0]] != b[ei[1]]).sum())}")  # fmt: skip
    same = torch.equal(
        knn_graph(x, 9, b, dilation=2, bias=bias, method="dense"),
        knn_graph(x, 9, b, dilation=2, bias=bias, method="torch_cluster"),
    )
    print(f"   both back-ends give the same edges: {same}")

    print("3. a graph convolution on it")
    conv = MRConv(48, 96).eval()
    with torch.no_grad():
        out = conv(x, ei, k=9)
    print(f"   {conv}: {tuple(x.shape)} -> {tuple(out.shape)}")

    print(f"4. a ViG backbone: {args.model}")
    model = vig_pyg.create_model(args.model).eval()
    stats = vig_pyg.model_stats(model)
    img = _synthetic_images(1, 224)
    with torch.no_grad():
        model(img)
        t0 = time.perf_counter()
        logits = model(img)
        dt = time.perf_counter() - t0
    print(f"   {stats['params'] / 1e6:.2f} M parameters, {stats['macs'] / 1e9:.2f} G MACs; "
          f"one 224x224 image -> logits {tuple(logits.shape)} in {dt * 1e3:.0f} ms "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    fx = vig_pyg.create_model(args.model, features_only=True).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in fx(img)]
    print(f"   features_only: {shapes}")


if __name__ == "__main__":
    main()
