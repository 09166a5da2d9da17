"""Images as graphs: the image <-> node bridge, kNN graphs, the graph builders (:mod:`.builders`) and
Pyramid ViG's relative-position term."""

from vig_pyg.graph.bridge import (
    batch_to_images,
    grid_positions,
    image_to_nodes,
    images_to_batch,
    nodes_to_image,
)
from vig_pyg.graph.builders import (
    DAGCGraph,
    Graph,
    GraphBuilder,
    GridGraph,
    GridKNNGraph,
    PatchGrid,
    RadiusGraph,
    RandomGraph,
    SVGAGraph,
    build_graph,
    list_graphs,
    register_graph,
)
from vig_pyg.graph.knn import LowRankBias, dense_knn, dilate, knn_graph, neighbors_to_edge_index
from vig_pyg.graph.relative_pos import relative_position_bias, relative_position_factors, sincos_pos_embed

__all__ = [
    "DAGCGraph",
    "Graph",
    "GraphBuilder",
    "GridGraph",
    "GridKNNGraph",
    "LowRankBias",
    "PatchGrid",
    "RadiusGraph",
    "RandomGraph",
    "SVGAGraph",
    "batch_to_images",
    "build_graph",
    "dense_knn",
    "dilate",
    "grid_positions",
    "image_to_nodes",
    "images_to_batch",
    "knn_graph",
    "list_graphs",
    "neighbors_to_edge_index",
    "nodes_to_image",
    "register_graph",
    "relative_position_bias",
    "relative_position_factors",
    "sincos_pos_embed",
]
