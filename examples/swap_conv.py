"""Swap the graph convolution: the same Pyramid ViG trained with ViG's four convs and stock PyG ones.

Every Grapher block takes its convolution by name (``create_model(..., conv=...)``): ViG's ``mr``, ``edge``,
``gin`` and ``sage``, or any PyTorch Geometric ``MessagePassing`` layer such as ``gat`` or ``gcn``. This
script trains ``pvig_test`` on the embedded digits with each, using a minimal loop (AdamW, cross entropy),
and prints one table row per conv: trainable parameters, validation top-1 and training time.

    python examples/swap_conv.py --quick          # a few steps on a few images: a smoke run
    python examples/swap_conv.py --epochs 3       # enough to tell the convs apart
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vig_pyg
from vig_pyg.data import load_digits_split

DEFAULT_CONVS = ("mr", "edge", "gin", "sage", "gat", "gcn")


def to_tensors(ds: torch.utils.data.Dataset, limit: int | None) -> tuple[Tensor, Tensor]:
    """A digits data set as normalised float images and labels (it is small: keep it in memory)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    # Evenly spaced so that a small subset still holds every class.
    idx = torch.linspace(0, len(ds) - 1, n).long().tolist()
    pairs = [ds[i] for i in idx]
    x = torch.stack([img for img, _ in pairs]).float().div_(255).sub_(0.5).div_(0.5)  # mean = std = 0.5
    return x, torch.tensor([t for _, t in pairs])


def train_one(
    conv: str, data: tuple[Tensor, Tensor, Tensor, Tensor], epochs: int, steps: int | None, batch_size: int
) -> tuple[int, float, float]:
    """Train ``pvig_test`` with ``conv``; return (parameters, val top-1 %, seconds)."""
    x_tr, y_tr, x_val, y_val = data
    torch.manual_seed(0)  # the same initialisation and batch order for every conv
    model: nn.Module = vig_pyg.create_model("pvig_test", num_classes=10, conv=conv)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    start = time.perf_counter()
    model.train()
    done = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(x_tr)).split(batch_size):
            if steps is not None and done >= steps:
                break
            loss = F.cross_entropy(model(x_tr[batch]), y_tr[batch], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb in x_val.split(256)])
    seconds = time.perf_counter() - start
    return params, 100.0 * (pred == y_val).float().mean().item(), seconds


def main(argv: list[str] | None = None) -> list[tuple[str, int, float, float]]:
    """Train once per conv and print the comparison table; return its rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--convs", nargs="+", default=list(DEFAULT_CONVS), help="see vig_pyg.nn.list_convs()")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="3 steps on 48 images per conv: seconds on a CPU")
    args = p.parse_args(argv)
    if args.quick:
        # A smoke run: one thread avoids oversubscribing a shared CPU, where 2 busy threads run ~30x slower.
        torch.set_num_threads(1)
    limit_train, limit_val = (48, 48) if args.quick else (None, None)
    steps = 3 if args.quick else None
    batch_size = 16 if args.quick else args.batch_size

    train_ds, val_ds = load_digits_split(size=96)  # pvig_test's input size
    data = (*to_tensors(train_ds, limit_train), *to_tensors(val_ds, limit_val))
    print(f"pvig_test on digits: {len(data[0])} train / {len(data[2])} val images")
    print(f"{'conv':<6} {'params':>8} {'val top-1':>10} {'seconds':>8}")
    rows = []
    for conv in args.convs:
        params, top1, secs = train_one(conv, data, args.epochs, steps, batch_size)
        rows.append((conv, params, top1, secs))
        print(f"{conv:<6} {params:>8,} {top1:>9.1f}% {secs:>8.1f}")
    return rows


if __name__ == "__main__":
    main()
