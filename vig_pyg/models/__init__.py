"""ViG model families, the registry and checkpoint conversion."""

from vig_pyg.models import isotropic, mobilevig, pyramid  # noqa: F401  (registers the variants)
from vig_pyg.models.base import FeatureExtractor, ViGModel, ViGStage
from vig_pyg.models.checkpoint import (
    convert_official,
    load_pretrained,
    load_state_dict_file,
    save_pretrained,
    to_official,
)
from vig_pyg.models.isotropic import IsotropicViG
from vig_pyg.models.mobilevig import MobileViG
from vig_pyg.models.pyramid import PyramidViG
from vig_pyg.models.registry import PRETRAINED, create_model, get_pretrained_cfg, list_models
from vig_pyg.models.stats import model_stats

__all__ = [
    "PRETRAINED",
    "FeatureExtractor",
    "IsotropicViG",
    "MobileViG",
    "PyramidViG",
    "ViGModel",
    "ViGStage",
    "convert_official",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "load_pretrained",
    "load_state_dict_file",
    "model_stats",
    "save_pretrained",
    "to_official",
]
