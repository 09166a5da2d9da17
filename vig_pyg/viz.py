"""Pictures of ViG's graphs: which patches each chosen patch is joined to, block by block.

Like the ViG paper's figure of graph structure: over the input image, a centre patch is filled and its
``k`` neighbours are outlined and joined to it by lines. With pooled keys (Pyramid ViG's reduce ratio
``r > 1``) a neighbour is an ``r x r`` cell of patches. The neighbours come from forward hooks on the
model's graph builders (:class:`~vig_pyg.graph.GraphBuilder`, any of them: a ragged graph too), so they
are exactly the edges the model uses.
Drawn with Pillow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from vig_pyg.data.transforms import EvalResize, Preprocessing, uint8_to_pil
from vig_pyg.graph.builders import Graph, GraphBuilder, GridKNNGraph, PatchGrid

__all__ = ["BlockGraph", "capture_graphs", "default_blocks", "draw_graphs", "visualize_graph"]

# Distinct, saturated colours for the chosen patches (colour-blind-friendly order).
PALETTE = [(230, 25, 75), (0, 130, 200), (255, 180, 0), (60, 180, 75), (145, 30, 180), (70, 240, 240)]


@dataclass(frozen=True)
class BlockGraph:
    """The graph one Grapher built for the first image of a batch.

    Attributes:
        index: position among the model's Graphers (0-based).
        name: the module path of the graph builder.
        channels: node feature width.
        height, width: the patch grid of the centre nodes.
        key_height, key_width: the grid of the key nodes (the centre grid pooled by ``reduce_ratio``).
        k: neighbours per node of a k-regular graph, ``None`` for a ragged one.
        reduce_ratio: the builder's key pooling.
        dilation: the kNN dilation used at this input size (``None`` for builders without one).
        description: the builder's settings (its ``describe``).
        edge_index: ``(2, E)``: row 0 the neighbour (key index), row 1 the centre (raster order).
    """

    index: int
    name: str
    channels: int
    height: int
    width: int
    key_height: int
    key_width: int
    k: int | None
    dilation: int | None
    reduce_ratio: int
    edge_index: Tensor
    description: str = ""

    def neighbours(self, centre: int) -> list[int]:
        """Key indices joined to centre node ``centre``."""
        return self.edge_index[0, self.edge_index[1] == centre].tolist()

    def centre_at(self, y: float, x: float) -> int:
        """The centre node under the point ``(y, x)`` given as fractions of the image height and width."""
        row = min(self.height - 1, max(0, int(y * self.height)))
        col = min(self.width - 1, max(0, int(x * self.width)))
        return row * self.width + col


def capture_graphs(model: nn.Module, images: Tensor) -> list[BlockGraph]:
    """Run ``model`` on ``images`` in eval mode and record every Grapher's graph (first image only).

    Args:
        model: a ViG model (any module containing :class:`~vig_pyg.graph.GraphBuilder` modules).
        images: a normalised batch ``(B, 3, H, W)``.
    """
    graphs: list[BlockGraph] = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, GraphBuilder)}

    def hook(module: GraphBuilder, args: tuple, kwargs: dict[str, Any], out: Graph) -> None:
        nodes, grid = (list(args) + [kwargs.get(n) for n in ("nodes", "grid")[len(args) :]])[:2]
        grid = PatchGrid(*grid)
        n = grid.num_nodes
        kh, kw = module.key_grid(grid.height, grid.width)
        ei = out.edge_index.detach().cpu()
        first = ei[:, ei[1] < n]  # centres of image 0 are 0..n-1 and their neighbours 0..m-1
        dilation = module.effective_dilation(kh * kw) if isinstance(module, GridKNNGraph) else None
        graphs.append(
            BlockGraph(
                index=len(graphs),
                name=names.get(module, ""),
                channels=int(nodes.size(1)),
                height=grid.height,
                width=grid.width,
                key_height=kh,
                key_width=kw,
                k=out.k,
                dilation=dilation,
                reduce_ratio=int(module.reduce_ratio),
                edge_index=first,
                description=module.describe(grid),
            )
        )

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return graphs


def default_blocks(graphs: Sequence[BlockGraph], limit: int = 4) -> list[int]:
    """The first block of each grid size (each pyramid stage), or blocks spread over the depth."""
    firsts, seen = [], set()
    for g in graphs:
        if (g.height, g.width) not in seen:
            seen.add((g.height, g.width))
            firsts.append(g.index)
    pool = firsts if len(firsts) > 1 else [g.index for g in graphs]
    if len(pool) <= limit:
        return pool
    return sorted({pool[round(i * (len(pool) - 1) / (limit - 1))] for i in range(limit)})


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel(img: Image.Image, g: BlockGraph, patches: Sequence[tuple[float, float]], size: int) -> Image.Image:
    base = img.convert("RGBA").resize((size, size), Image.Resampling.BICUBIC)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    ch, cw = size / g.height, size / g.width  # one centre patch, in display pixels
    kh, kw = ch * g.reduce_ratio, cw * g.reduce_ratio  # one key cell
    if g.height <= 32:  # a faint patch grid, as long as it stays readable
        for i in range(1, g.height):
            draw.line([(0, i * ch), (size, i * ch)], fill=(255, 255, 255, 40))
        for j in range(1, g.width):
            draw.line([(j * cw, 0), (j * cw, size)], fill=(255, 255, 255, 40))
    line_w = max(1, size // 160)
    centres = []
    for p, (y, x) in enumerate(patches):
        colour = PALETTE[p % len(PALETTE)]
        c = g.centre_at(y, x)
        cy, cx = divmod(c, g.width)
        centres.append((colour, cx, cy))
        centre_xy = ((cx + 0.5) * cw, (cy + 0.5) * ch)
        for j in g.neighbours(c):
            ky, kx = divmod(j, g.key_width)
            box = [kx * kw + 1, ky * kh + 1, (kx + 1) * kw - 1, (ky + 1) * kh - 1]
            draw.rectangle(box, fill=(*colour, 60), outline=(*colour, 230), width=line_w)
            nxy = ((kx + 0.5) * kw, (ky + 0.5) * kh)
            draw.line([centre_xy, nxy], fill=(*colour, 200), width=line_w)
            rad = max(2, line_w + 1)
            draw.ellipse([nxy[0] - rad, nxy[1] - rad, nxy[0] + rad, nxy[1] + rad], fill=(*colour, 255))
    # Centres last, so that no neighbour cell hides them: solid, with a white and a black rim.
    for colour, cx, cy in centres:
        box = [cx * cw, cy * ch, (cx + 1) * cw, (cy + 1) * ch]
        draw.rectangle(box, outline=(0, 0, 0, 255), width=line_w)
        inner = [box[0] + line_w, box[1] + line_w, box[2] - line_w, box[3] - line_w]
        draw.rectangle(inner, fill=(*colour, 235), outline=(255, 255, 255, 255), width=line_w)
    return Image.alpha_composite(base, overlay).convert("RGB")


def draw_graphs(
    image: Image.Image,
    graphs: Sequence[BlockGraph],
    patches: Sequence[tuple[float, float]] = ((0.5, 0.5),),
    blocks: Sequence[int] | None = None,
    panel_size: int = 320,
    title: str | None = None,
) -> Image.Image:
    """One panel per chosen block, side by side: the image with each patch's neighbours drawn over it.

    Args:
        image: the model's input image (what the graphs were computed on).
        graphs: from :func:`capture_graphs`.
        patches: centre patches as ``(y, x)`` fractions of the image height and width (one colour each).
        blocks: indices into ``graphs`` (negative counts from the end); default :func:`default_blocks`.
        panel_size: side of each panel in pixels.
        title: a line above the panels.
    """
    if not graphs:
        raise ValueError("no graphs to draw: the model has no graph builders (GraphBuilder modules)")
    if not patches:
        raise ValueError("choose at least one patch")
    for y, x in patches:
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise ValueError(f"patch position ({y}, {x}) must be fractions of the image size, in [0, 1]")
    chosen = default_blocks(graphs) if blocks is None else list(blocks)
    if not chosen:
        raise ValueError("choose at least one block")
    for b in chosen:
        if not -len(graphs) <= b < len(graphs):
            raise ValueError(
                f"block {b} does not exist: the model has {len(graphs)} graph blocks (0-{len(graphs) - 1})"
            )
    font = _font(max(10, panel_size // 22))
    small = _font(max(9, panel_size // 26))
    pad, head = 8, max(14, panel_size // 22) * 2 + 10
    top = head + (max(14, panel_size // 18) + 8 if title else 0)
    out = Image.new("RGB", (pad + len(chosen) * (panel_size + pad), top + panel_size + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=_font(max(12, panel_size // 18)))
    for i, b in enumerate(chosen):
        g = graphs[b]
        x0 = pad + i * (panel_size + pad)
        label = f"block {g.index}: {g.height}x{g.width} nodes"
        detail = (g.description or (f"k={g.k}" if g.k is not None else "ragged")) + (
            f"  keys pooled {g.reduce_ratio}x{g.reduce_ratio}" if g.reduce_ratio > 1 else ""
        )
        draw.text((x0, top - head + 2), label, fill=(0, 0, 0), font=font)
        draw.text((x0, top - head / 2 + 1), detail, fill=(80, 80, 80), font=small)
        out.paste(_panel(image, g, patches, panel_size), (x0, top))
    return out


def visualize_graph(
    model: nn.Module,
    image: Image.Image | Tensor,
    preprocessing: Preprocessing,
    patches: Sequence[tuple[float, float]] = ((0.5, 0.5),),
    blocks: Sequence[int] | None = None,
    panel_size: int = 320,
    title: str | None = None,
) -> Image.Image:
    """Preprocess ``image``, run ``model`` on it and draw the neighbours of ``patches``.

    See :func:`draw_graphs` for the picture.

    Args:
        model: a ViG model.
        image: a PIL image (resized and centre-cropped as for evaluation) or a ``uint8`` tensor
            ``(3, H, W)`` already at the input size.
        preprocessing: the model's preprocessing (a checkpoint's, or the official one).
        patches, blocks, panel_size, title: as for :func:`draw_graphs`.
    """
    if isinstance(image, Image.Image):
        x = EvalResize(preprocessing)(image)
    else:
        x = image
        if x.dtype != torch.uint8 or x.dim() != 3:
            raise ValueError("a tensor image must be uint8 (3, H, W)")
    mean = torch.tensor(preprocessing.mean).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std).view(-1, 1, 1)
    device = next(model.parameters()).device
    batch = ((x.float() / 255 - mean) / std).unsqueeze(0).to(device)
    graphs = capture_graphs(model, batch)
    return draw_graphs(uint8_to_pil(x), graphs, patches, blocks, panel_size, title)
