"""Training, evaluation and checkpoints (imports the library; the library never imports this package)."""

from vig_pyg.train.checkpoint import (
    CheckpointInfo,
    capture_rng_state,
    convert_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from vig_pyg.train.distributed import DistInfo, setup_distributed
from vig_pyg.train.loop import TrainConfig, TrainResult, evaluate, evaluate_checkpoint, train
from vig_pyg.train.schedule import WarmupCosine

__all__ = [
    "CheckpointInfo",
    "DistInfo",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "capture_rng_state",
    "convert_checkpoint",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
