"""The graph picture: neighbours captured by hooks, drawn with Pillow."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vig_pyg
from vig_pyg.data import Preprocessing
from vig_pyg.viz import PALETTE, capture_graphs, default_blocks, draw_graphs, visualize_graph


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return vig_pyg.create_model("pvig_test", num_classes=10, img_size=33, k=4).eval()


def test_capture_records_every_block_k_neighbours_per_centre(model: torch.nn.Module) -> None:
    graphs = capture_graphs(model, torch.randn(2, 3, 33, 33))
    assert len(graphs) == sum(model.depths)
    assert [g.reduce_ratio for g in graphs] == [4, 2, 1, 1, 1]
    for g in graphs:
        n = g.height * g.width
        assert g.edge_index.shape == (2, n * g.k)  # the first image only
        assert torch.equal(torch.bincount(g.edge_index[1], minlength=n), torch.full((n,), g.k))
        assert 0 <= g.edge_index[0].min() and g.edge_index[0].max() < g.key_height * g.key_width
        assert len(g.neighbours(g.centre_at(0.5, 0.5))) == g.k
    first = graphs[0]
    assert (first.height, first.width, first.key_height, first.key_width) == (9, 9, 2, 2)
    assert first.channels == 12
    assert model.training is False


def test_neighbours_are_the_ones_the_model_uses(model: torch.nn.Module) -> None:
    # The hook sees the module's real output: calling the module again on its inputs gives the same edges.
    seen = {}

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["args"] = args

    knn = model.stages[2].blocks[0].grapher.graph
    handle = knn.register_forward_hook(keep)
    try:
        graphs = capture_graphs(model, torch.randn(1, 3, 33, 33))
    finally:
        handle.remove()
    with torch.no_grad():
        again = knn(*seen["args"]).edge_index
    assert torch.equal(graphs[2].edge_index, again)


def test_default_blocks_take_one_per_stage(model: torch.nn.Module) -> None:
    graphs = capture_graphs(model, torch.randn(1, 3, 33, 33))
    assert default_blocks(graphs) == [0, 1, 2, 4]
    iso = vig_pyg.create_model("vig_test", num_classes=10).eval()
    assert default_blocks(capture_graphs(iso, torch.randn(1, 3, 96, 96))) == [0, 1, 2, 3]


def test_draw_marks_the_centre_patch(model: torch.nn.Module) -> None:
    graphs = capture_graphs(model, torch.randn(1, 3, 33, 33))
    img = Image.new("RGB", (33, 33), (0, 0, 0))
    pic = draw_graphs(img, graphs, patches=[(0.5, 0.5)], blocks=[2], panel_size=90, title="t")
    assert pic.mode == "RGB" and pic.width == 8 + 98
    # Block 2 has a 3x3 grid: the centre cell's middle is filled with the first palette colour.
    top = pic.height - 8 - 90
    r, g, b = pic.getpixel((8 + 45, top + 45))
    assert abs(r - PALETTE[0][0]) < 40 and abs(g - PALETTE[0][1]) < 40 and abs(b - PALETTE[0][2]) < 40
    with pytest.raises(ValueError, match="does not exist"):
        draw_graphs(img, graphs, blocks=[7])
    with pytest.raises(ValueError, match="fractions"):
        draw_graphs(img, graphs, patches=[(1.5, 0.2)])


def test_visualize_from_a_pil_image(model: torch.nn.Module) -> None:
    pre = Preprocessing(input_size=(3, 33, 33), crop_pct=0.9)
    photo = Image.new("RGB", (80, 50), (120, 200, 40))
    pic = visualize_graph(model, photo, pre, patches=[(0.2, 0.2), (0.8, 0.8)], panel_size=64)
    assert pic.width == 8 + 4 * 72
    with pytest.raises(ValueError, match="uint8"):
        visualize_graph(model, torch.zeros(3, 33, 33), pre)
