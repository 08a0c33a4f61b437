"""Training, evaluation and checkpoints: ``train``, ``evaluate``, ``save_model`` / ``load_model``."""

from dynaneural.engine.batch_norm import BatchNormRecalibration, recalibrate_batch_norm
from dynaneural.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    TrainingState,
    load_model,
    load_training_state,
    load_weights,
    read_checkpoint,
    save_model,
)
from dynaneural.engine.trainer import (
    CHECKPOINT_NAME,
    EvalResult,
    TrainConfig,
    TrainResult,
    WarmupCosine,
    default_device,
    evaluate,
    train,
)

__all__ = [
    "BatchNormRecalibration",
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "TrainingState",
    "WarmupCosine",
    "default_device",
    "evaluate",
    "load_model",
    "load_training_state",
    "load_weights",
    "read_checkpoint",
    "recalibrate_batch_norm",
    "save_model",
    "train",
]
