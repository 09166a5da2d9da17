"""Inference with saved weights: build a model, save it, load it back by path, classify images.

The round trip is the one a user of released weights follows: ``save_pretrained`` writes a safetensors file,
``create_model(name, pretrained=path)`` rebuilds the architecture and loads it, and the model's preprocessing
(mean, std, interpolation, crop) comes from ``vig_pyg.models.get_pretrained_cfg``. The model here is
untrained, so the predictions are arbitrary; the point is the API and that the reloaded model gives the same
logits as the one that was saved.

    python examples/inference.py --quick
    python examples/inference.py --model pvig_ti_224_gelu --out pvig_ti.safetensors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import vig_pyg
from vig_pyg.data import DIGITS_CLASSES, load_digits_split
from vig_pyg.models import get_pretrained_cfg, save_pretrained


def digit_images(n: int, size: int) -> tuple[Tensor, Tensor]:
    """``n`` validation digits as uint8 ``(n, 3, size, size)`` images and their labels."""
    _, val = load_digits_split(size=size)
    pairs = [val[i] for i in range(n)]
    return torch.stack([img for img, _ in pairs]), torch.tensor([t for _, t in pairs])


def preprocess(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images -> normalised float input, as the model's config asks."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def main(argv: list[str] | None = None) -> None:
    """Save, reload and run a model; print its preprocessing and each image's top-5 classes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: pvig_ti_224_gelu (pvig_test with --quick)")
    p.add_argument("--out", default=None, help="where to write the .safetensors file (default: a temp dir)")
    p.add_argument("--images", type=int, default=4, help="how many digits to classify")
    p.add_argument("--quick", action="store_true", help="tiny model and input: a few seconds on a CPU")
    args = p.parse_args(argv)
    name = args.model or ("pvig_test" if args.quick else "pvig_ti_224_gelu")
    if args.quick:
        torch.set_num_threads(1)  # a smoke run: do not oversubscribe a shared CPU
    torch.manual_seed(0)

    # The tiny test models have no official weights; show the preprocessing the official ones expect.
    cfg = get_pretrained_cfg(name) or get_pretrained_cfg("pvig_ti_224_gelu")
    print(f"preprocessing: mean={cfg.mean} std={cfg.std} {cfg.interpolation} crop_pct={cfg.crop_pct}")

    # Ten classes so that the digit names label the outputs.
    model = vig_pyg.create_model(name, num_classes=len(DIGITS_CLASSES)).eval()
    size = int(model.img_size[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out) if args.out else Path(tmp) / f"{name}.safetensors"
        save_pretrained(model, path)
        print(f"saved {name} weights: {path.name} ({path.stat().st_size / 1e6:.2f} MB)")
        loaded = vig_pyg.create_model(name, num_classes=len(DIGITS_CLASSES), pretrained=str(path)).eval()

    images, labels = digit_images(args.images, size)
    x = preprocess(images, cfg.mean, cfg.std)
    with torch.no_grad():
        logits = loaded(x)
        same = torch.allclose(logits, model(x), atol=1e-5)
    print(f"reloaded model matches the saved one: {same}")
    probs = F.softmax(logits, dim=1)
    top_p, top_i = probs.topk(5, dim=1)
    print(f"top-5 on {len(images)} digits of {size}x{size} (untrained weights: arbitrary classes)")
    for b in range(len(images)):
        pairs = zip(top_i[b].tolist(), top_p[b].tolist())
        ranked = "  ".join(f"{DIGITS_CLASSES[i]}:{pr:.3f}" for i, pr in pairs)
        print(f"  image {b} (label {DIGITS_CLASSES[labels[b]]}): {ranked}")


if __name__ == "__main__":
    main()
