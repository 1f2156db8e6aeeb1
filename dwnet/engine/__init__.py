"""The DeepSpeed training engine: config generation, optimizer, loop, checkpoints, export."""
from .resume import ResumeMismatchError
from .trainer import Trainer, TrainingDiverged

__all__ = ["ResumeMismatchError", "Trainer", "TrainingDiverged"]
