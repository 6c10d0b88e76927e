"""Training: the run as a recipe (config, setup, the step, evaluation, checkpoints), its objectives, the processes
it runs as, and the training-only kernels' autograd functions."""

from loratune.train.config import TrainConfig, load_config, validate_config
from loratune.train.trainer import TrainingDiverged, TrainingInterrupted, prepare_data, train

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
    "prepare_data",
    "train",
    "validate_config",
]
