"""The DeepSpeed training engine: config generation, optimizer, loop, checkpoints, export."""
from .trainer import Trainer, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged"]
