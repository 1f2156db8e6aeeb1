"""The DeepSpeed training engine: config generation, optimizer, loop, checkpoints, export."""
from .trainer import ResumeMismatchError, Trainer, TrainingDiverged

__all__ = ["ResumeMismatchError", "Trainer", "TrainingDiverged"]
