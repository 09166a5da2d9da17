"""``make demo``: train a small Pyramid ViG on real handwritten digits, then draw the graphs it builds.

The digits are scikit-learn's 1,797 8x8 scans (shipped inside the package: no download), upscaled to
96x96. ``pvig_test`` (0.1 M parameters, four stages, k=9) reaches about 98% validation accuracy in 12
epochs, about two minutes on two CPU cores. Then one validation digit goes through the trained model with
hooks on every graph block, and a PNG shows which patches two chosen patches are joined to: on the first
stages a neighbour is a pooled 4x4 or 2x2 cell of patches, on the last ones single patches.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import torch

from vig_pyg.errors import UsageError, one_line


def _patches(img: torch.Tensor) -> list[tuple[float, float]]:
    """A patch on the digit's stroke (nearest the centre) and one on the background, as (y, x) fractions."""
    grey = img[0].float()
    h, w = grey.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    # Background: the dark spot nearest the upper right, where most digits leave space.
    corner = (yy - 0.2 * h) ** 2 + (xx - 0.8 * w) ** 2
    out = []
    for mask, target in ((grey > 0.6 * grey.max(), dist), (grey < 0.1 * grey.max(), corner)):
        if mask.any():
            p = int(torch.where(mask, target, torch.inf).argmin())
            out.append(((p // w + 0.5) / h, (p % w + 0.5) / w))
    return out or [(0.5, 0.5)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="run directory (replaced on every demo run)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--index", type=int, default=0, help="which validation digit to draw")
    args = parser.parse_args(argv)

    from vig_pyg.data import load_digits_split
    from vig_pyg.data.transforms import batch_transform
    from vig_pyg.files import atomic_write_bytes
    from vig_pyg.train import TrainConfig, load_model, train
    from vig_pyg.viz import visualize_graph

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logger = logging.getLogger("vig_pyg")
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # a PyG/torch API notice

    t0 = time.perf_counter()
    print(f"1. training pvig_test on the embedded handwritten digits (96x96, k=9, {args.epochs} epochs)")
    try:
        result = train(TrainConfig(out_dir=args.out, epochs=args.epochs, overwrite=True))
    except UsageError as err:
        print(f"demo: error: {one_line(err)}", file=sys.stderr)
        return 2
    train_s = time.perf_counter() - t0

    print("2. the graphs of one validation digit, drawn block by block")
    model, info = load_model(result.best_checkpoint)
    _, val = load_digits_split(info.preprocessing.size, val_fraction=0.2, seed=0)
    img, label = val[args.index]
    with torch.no_grad():
        pred = int(model.eval()(batch_transform(info.preprocessing)(img[None])).argmax())
    title = (
        f"pvig_test after {result.epochs_done} epochs: validation digit {label}, predicted {pred}. Filled: "
        "a stroke patch (red), a background patch (blue); outlined: their k neighbours"
    )
    picture = visualize_graph(model, img, info.preprocessing, _patches(img), title=title, panel_size=300)
    out = Path(args.out) / "graph.png"
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    print(f"   graph picture: {out}")
    print(f"   training took {train_s:.0f} s, the whole demo {time.perf_counter() - t0:.0f} s")
    print(f"best val top-1: {result.best_top1:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
