"""Training, evaluation and checkpoints (imports the library; the library never imports this package).

One module per job: ``config`` (the options of a run), ``datasets`` (its data), ``loop`` (training),
``evaluate`` (scores of models and checkpoints), ``checkpoint`` (the checkpoint format, models rebuilt
from checkpoints), ``rundir`` (the run folder: its lock and the order files are written in),
``distributed`` (torchrun), ``schedule`` (the learning rate).
"""

from vig_pyg.train.checkpoint import (
    CheckpointInfo,
    capture_rng_state,
    convert_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from vig_pyg.train.config import TrainConfig
from vig_pyg.train.distributed import DistInfo, setup_distributed
from vig_pyg.train.evaluate import evaluate, evaluate_checkpoint
from vig_pyg.train.loop import TrainResult, train
from vig_pyg.train.rundir import RunDir
from vig_pyg.train.schedule import WarmupCosine

__all__ = [
    "CheckpointInfo",
    "DistInfo",
    "RunDir",
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
