"""scikit-learn's handwritten digits as a small, real, download-free image classification set.

1,797 grey 8x8 images of the digits 0-9 ship inside scikit-learn (``sklearn.datasets.load_digits``). They
are upscaled (bicubic) to the model's input size, replicated to three channels and split into train and
validation sets by a fixed stratified permutation, so that every run sees the same split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from vig_pyg.errors import DataError

__all__ = ["DIGITS_CLASSES", "TensorImageDataset", "load_digits_split"]

DIGITS_CLASSES = [str(i) for i in range(10)]


class TensorImageDataset(Dataset):
    """In-memory images: ``uint8`` tensors ``(N, 1 or 3, H, W)`` and labels; yields ``(3, H, W)`` images.

    Args:
        images: the images; a single channel is repeated to three when read.
        targets: class indices.
        classes: class names, indexed by target.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: list[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        self.images, self.targets, self.classes = images, targets.long(), list(classes)

    def __len__(self) -> int:
        return self.images.size(0)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        return img.expand(3, -1, -1) if img.size(0) == 1 else img, int(self.targets[i])


def _upscale(images: np.ndarray, size: tuple[int, int]) -> Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x.clamp_(0.0, 1.0).mul_(255).round_().to(torch.uint8)


def load_digits_split(
    size: int | tuple[int, int] = 48, val_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The digits, upscaled to ``size``, as fixed ``(train, val)`` data sets.

    Args:
        size: output image size (an int for square images, or ``(height, width)``).
        val_fraction: share of each class held out for validation.
        seed: the split's permutation seed (the default split is the one reported in the README).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # an optional dependency: say how to get it
        raise DataError(
            "the embedded digits data set needs scikit-learn: pip install scikit-learn (or pass --data DIR)"
        ) from err
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    digits = load_digits()
    images, targets = digits.images, digits.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    # Sorted so that the order does not depend on the class loop; the sampler shuffles anyway.
    tr, va = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
    all_images = _upscale(images, hw)
    y = torch.from_numpy(targets)
    return (
        TensorImageDataset(all_images[tr], y[tr], DIGITS_CLASSES),
        TensorImageDataset(all_images[va], y[va], DIGITS_CLASSES),
    )
