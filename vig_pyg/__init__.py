"""vig_pyg: Vision GNN (ViG, Pyramid ViG) built natively on PyTorch Geometric."""

from vig_pyg.models import create_model, list_models, model_stats

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "model_stats"]
