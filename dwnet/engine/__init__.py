"""The DeepSpeed training engine: config generation, optimizer, loop, checkpoints, export."""
from .trainer import Trainer, TrainingDiverged, build_model

__all__ = ["Trainer", "TrainingDiverged", "build_model"]
