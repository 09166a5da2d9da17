"""Images as graphs: the image <-> node bridge, kNN graphs and Pyramid ViG's relative-position term."""

from vig_pyg.graph.bridge import (
    batch_to_images,
    grid_positions,
    image_to_nodes,
    images_to_batch,
    nodes_to_image,
)
from vig_pyg.graph.knn import LowRankBias, dense_knn, dilate, knn_graph, neighbors_to_edge_index
from vig_pyg.graph.relative_pos import relative_position_bias, relative_position_factors, sincos_pos_embed

__all__ = [
    "LowRankBias",
    "batch_to_images",
    "dense_knn",
    "dilate",
    "grid_positions",
    "image_to_nodes",
    "images_to_batch",
    "knn_graph",
    "neighbors_to_edge_index",
    "nodes_to_image",
    "relative_position_bias",
    "relative_position_factors",
    "sincos_pos_embed",
]
