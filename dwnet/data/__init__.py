"""Data loading for training and evaluation: ffcv .beton files (written by `python -m data_prep`)
or torchvision ImageFolder trees, with the same sharding, per-sample randomness and batch
augmentations (RandAugment, random erasing, mixup/cutmix, label smoothing) on the device."""
from .loaders import TrainLoader, ValLoader, build_train_loader, build_val_loader

__all__ = ["TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]
