"""Preprocessing: the official evaluation pipeline and kornia training augmentation.

Every data set here yields ``uint8`` images of shape ``(3, H, W)`` at the model's input size; the float
conversion, the augmentation and the normalisation then run on whole batches on the training device
(:func:`batch_transform`), which is where kornia is fast. Only the random resized crop runs per image
(:class:`TrainCrop`), because it needs each image at its own original size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "EvalResize",
    "Preprocessing",
    "TrainCrop",
    "batch_transform",
    "pil_to_uint8",
    "to_rgb",
    "uint8_to_pil",
]

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# kornia's resampling modes; it has no Lanczos, bicubic is the closest.
_KORNIA_INTERPOLATION = {
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "lanczos": "BICUBIC",
}


@dataclass(frozen=True)
class Preprocessing:
    """What a model's inputs must look like; every vig_pyg checkpoint stores one.

    Args:
        input_size: ``(channels, height, width)`` the model was trained at.
        mean, std: per-channel normalisation of ``[0, 1]`` pixel values (the official weights use 0.5, 0.5).
        crop_pct: evaluation resizes to ``input_size / crop_pct`` and centre-crops ``input_size``.
        interpolation: ``"bicubic"`` (official), ``"bilinear"``, ``"nearest"`` or ``"lanczos"``.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(_PIL_INTERPOLATION)}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return int(self.input_size[1]), int(self.input_size[2])

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only, so that checkpoints load with ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["input_size"] = [int(v) for v in self.input_size]
        d["mean"], d["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
        )


# Pillow's modes of 16-bit (and 32-bit integer) greyscale images, e.g. 16-bit PNGs and TIFFs.
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, rescaling 16-bit and float greyscale instead of clipping it.

    Pillow's own ``convert("RGB")`` clips a 16-bit image's values at 255, which turns almost every
    pixel white. 16-bit (and 32-bit integer) images are taken to span 0-65535 and float images 0-1 (or
    0-255 when their values exceed 1); 16-bit colour PNGs already open as 8-bit RGB.
    """
    if img.mode in _WIDE_INT_MODES:
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")  # a new, fully decoded image even when img is RGB already


def pil_to_uint8(img: Image.Image) -> Tensor:
    """A PIL image as an RGB ``uint8`` tensor ``(3, H, W)`` (see :func:`to_rgb`)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def uint8_to_pil(x: Tensor) -> Image.Image:
    """The inverse of :func:`pil_to_uint8`."""
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


class EvalResize:
    """The official evaluation resize: shorter side to ``size / crop_pct``, then a centre crop of ``size``.

    As timm computes it: the resize target is ``floor(size / crop_pct)`` and the crop is centred with
    rounding, so that vig_pyg scores official weights the way their authors did.
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.size = pre.size
        self.crop_pct = pre.crop_pct
        self.resample = _PIL_INTERPOLATION[pre.interpolation]

    def __call__(self, img: Image.Image) -> Tensor:
        h, w = self.size
        img = to_rgb(img)
        if h == w:
            scale = math.floor(h / self.crop_pct)
            iw, ih = img.size
            # Shorter side to `scale`, keeping the aspect ratio.
            if iw <= ih:
                new = (scale, max(1, int(scale * ih / iw)))
            else:
                new = (max(1, int(scale * iw / ih)), scale)
        else:
            new = (math.floor(w / self.crop_pct), math.floor(h / self.crop_pct))
        img = img.resize(new, self.resample)
        left, top = round((new[0] - w) / 2.0), round((new[1] - h) / 2.0)
        img = img.crop((left, top, left + w, top + h))
        return pil_to_uint8(img)


class TrainCrop:
    """The standard ImageNet training crop (random area and aspect ratio), with kornia, per image.

    Args:
        pre: the target size and interpolation.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio.
    """

    def __init__(
        self,
        pre: Preprocessing,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        import kornia.augmentation as K

        self.crop = K.RandomResizedCrop(
            pre.size,
            scale=tuple(scale),  # type: ignore[arg-type]
            ratio=tuple(ratio),  # type: ignore[arg-type]
            resample=_KORNIA_INTERPOLATION[pre.interpolation],
        )

    def __call__(self, img: Image.Image) -> Tensor:
        x = pil_to_uint8(img).unsqueeze(0).float().div_(255)
        x = self.crop(x)[0]
        return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


class _BatchTransform(nn.Module):
    """``uint8`` batch -> float in ``[0, 1]`` -> augmentation (training only) -> normalisation."""

    def __init__(self, augment: nn.Module | None, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.augment = augment
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            x = self.augment(x).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std


def batch_transform(pre: Preprocessing, augment: str | None = None) -> nn.Module:
    """The on-device part of the pipeline for a batch of ``uint8`` images.

    Args:
        pre: supplies mean and std.
        augment: ``None`` (evaluation), ``"imagenet"`` (horizontal flip and colour jitter; the random
            resized crop has already run per image) or ``"digits"`` (small random affine moves, no flip:
            a mirrored digit is another symbol).
    """
    aug: nn.Module | None = None
    if augment is not None:
        import kornia.augmentation as K

        if augment == "imagenet":
            aug = nn.Sequential(K.RandomHorizontalFlip(), K.ColorJitter(0.4, 0.4, 0.4, p=0.8))
        elif augment == "digits":
            aug = K.RandomAffine(degrees=12.0, translate=(0.1, 0.1), scale=(0.85, 1.1), p=1.0)
        else:
            raise ValueError(f"unknown augmentation {augment!r}; choose 'imagenet' or 'digits'")
    return _BatchTransform(aug, pre.mean, pre.std)
