"""The one bridge between images and graphs.

A ``(B, C, H, W)`` feature map is a batch of ``B`` grid graphs whose nodes are the ``H * W`` patches in
raster order (node ``row * W + col``). Everything in vig_pyg that moves between the image layout and the
node layout ``(B * H * W, C)`` goes through this module, so the node order is defined in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

__all__ = [
    "batch_to_images",
    "grid_positions",
    "image_to_nodes",
    "images_to_batch",
    "nodes_to_image",
]


def _check_image(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D feature map (B, C, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )


def image_to_nodes(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * H * W, C)`` node features in raster order."""
    _check_image(x)
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*H*W, C)


def nodes_to_image(x: Tensor, batch_size: int, height: int, width: int) -> Tensor:
    """``(B * H * W, C)`` node features -> ``(B, C, H, W)``; the exact inverse of :func:`image_to_nodes`."""
    if x.dim() != 2 or x.size(0) != batch_size * height * width:
        raise ValueError(
            f"expected node features of shape ({batch_size * height * width}, C) for a batch of "
            f"{batch_size} grids of {height}x{width}, got {tuple(x.shape)}"
        )
    return x.view(batch_size, height, width, x.size(1)).permute(0, 3, 1, 2)  # (B, C, H, W)


def grid_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(H * W, 2)`` integer ``(row, col)`` of every node of an ``H x W`` grid, in raster order."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=1)


def images_to_batch(x: Tensor | Sequence[Tensor]) -> Batch:
    """Turn feature maps into one :class:`torch_geometric.data.Batch` of patch graphs.

    Args:
        x: a ``(B, C, H, W)`` tensor, or a sequence of ``(C, H, W)`` tensors of possibly different sizes
            (ragged graphs: each image keeps its own node count).

    Returns:
        A batch with ``x`` (``(sum_b H_b W_b, C)``, raster order per image), ``pos`` (``(row, col)`` per
        node), ``batch``, ``ptr`` and ``grid_size`` (``(B, 2)``: each image's ``(H, W)``), which
        :func:`batch_to_images` uses to go back. The batch has no edges; build them with
        :func:`vig_pyg.graph.knn_graph`.
    """
    if isinstance(x, Tensor):
        _check_image(x)
        images = list(x.unbind(0))
    elif isinstance(x, Sequence) and not isinstance(x, str):
        images = list(x)
        if not images:
            raise ValueError("images_to_batch() needs at least one image")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"image {i} must be a (C, H, W) tensor, got {shape}")
        channels = {img.size(0) for img in images}
        if len(channels) > 1:
            raise ValueError(f"all images must have the same channel count, got {sorted(channels)}")
    else:
        raise TypeError(
            f"expected a (B, C, H, W) tensor or a list of (C, H, W) tensors, got {type(x).__name__}"
        )

    data_list = []
    for img in images:
        _, h, w = img.shape
        data_list.append(
            Data(
                x=img.permute(1, 2, 0).reshape(h * w, -1),  # (H*W, C)
                pos=grid_positions(h, w, img.device),
                grid_size=torch.tensor([[h, w]], device=img.device),
            )
        )
    return Batch.from_data_list(data_list)


def batch_to_images(batch: Batch) -> Tensor | list[Tensor]:
    """Invert :func:`images_to_batch`.

    Returns a ``(B, C, H, W)`` tensor when every graph has the same grid, else a list of ``(C, H, W)``
    tensors, one per graph.
    """
    if not isinstance(batch, Batch) or getattr(batch, "grid_size", None) is None:
        raise TypeError("batch_to_images() takes a Batch made by images_to_batch() (it needs `grid_size`)")
    sizes = [(int(h), int(w)) for h, w in batch.grid_size.tolist()]
    counts = [h * w for h, w in sizes]
    if sum(counts) != batch.x.size(0):
        raise ValueError(
            f"the batch holds {batch.x.size(0)} nodes but its grid sizes {sizes} need {sum(counts)}"
        )
    parts = batch.x.split(counts, dim=0)
    images = [p.reshape(h, w, -1).permute(2, 0, 1) for p, (h, w) in zip(parts, sizes)]  # (C, H, W) each
    if len(set(sizes)) == 1:
        return torch.stack(images, dim=0)
    return images
