"""Training: config, loop, loss, schedule, checkpoints, metrics, evaluation and generation."""

from loratune.train.config import TrainConfig, load_config, validate_config
from loratune.train.evaluate import EvalResult, evaluate
from loratune.train.generation import exact_match, generate_greedy, stream_greedy
from loratune.train.trainer import TrainingDiverged, TrainingInterrupted, prepare_data, train

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "exact_match",
    "generate_greedy",
    "load_config",
    "prepare_data",
    "stream_greedy",
    "train",
    "validate_config",
]
