"""The training loop on DeepSpeed: the Trainer, its step guard, optimizer and DeepSpeed config,
meters, evaluation and run log. Checkpoints are `dwnet.checkpoint`'s."""
from dwnet.checkpoint.resume import ResumeMismatchError

from .trainer import Trainer, TrainingDiverged

__all__ = ["ResumeMismatchError", "Trainer", "TrainingDiverged"]
