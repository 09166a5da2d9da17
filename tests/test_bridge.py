from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from vig_pyg.graph import batch_to_images, grid_positions, image_to_nodes, images_to_batch, nodes_to_image


def test_round_trip_equal_sizes() -> None:
    x = torch.randn(3, 5, 4, 6)
    batch = images_to_batch(x)
    assert isinstance(batch, Batch)
    assert batch.num_graphs == 3
    assert batch.x.shape == (3 * 4 * 6, 5)
    assert torch.equal(batch.batch, torch.arange(3).repeat_interleave(24))
    assert batch.grid_size.tolist() == [[4, 6]] * 3
    # raster order: node row * W + col of image b holds x[b, :, row, col]
    assert torch.equal(batch.x[24 + 2 * 6 + 5], x[1, :, 2, 5])
    assert torch.equal(batch.pos[24 + 2 * 6 + 5], torch.tensor([2, 5]))
    back = batch_to_images(batch)
    assert isinstance(back, torch.Tensor) and torch.equal(back, x)


def test_round_trip_ragged() -> None:
    images = [torch.randn(3, 4, 4), torch.randn(3, 2, 7), torch.randn(3, 1, 1)]
    batch = images_to_batch(images)
    assert batch.x.shape == (16 + 14 + 1, 3)
    assert torch.bincount(batch.batch).tolist() == [16, 14, 1]
    back = batch_to_images(batch)
    assert isinstance(back, list) and len(back) == 3
    assert all(torch.equal(a, b) for a, b in zip(images, back))


def test_node_layout_inverse() -> None:
    x = torch.randn(2, 7, 3, 5)
    nodes = image_to_nodes(x)
    assert nodes.shape == (30, 7)
    assert torch.equal(nodes, images_to_batch(x).x)
    assert torch.equal(nodes_to_image(nodes, 2, 3, 5), x)


def test_grid_positions() -> None:
    pos = grid_positions(2, 3)
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="4-D"):
        images_to_batch(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        image_to_nodes(torch.randn(3, 4, 4))
    with pytest.raises(TypeError):
        images_to_batch("not an image")
    with pytest.raises(ValueError, match="same channel count"):
        images_to_batch([torch.randn(3, 2, 2), torch.randn(4, 2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        images_to_batch([])
    with pytest.raises(ValueError):
        nodes_to_image(torch.randn(10, 3), 2, 2, 2)
    with pytest.raises(TypeError, match="images_to_batch"):
        batch_to_images(Batch.from_data_list([]) if False else object())  # type: ignore[arg-type]
