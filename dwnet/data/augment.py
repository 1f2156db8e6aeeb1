"""Batch-level steps after decoding, shared by both backends: RandAugment on the uint8 batch,
normalisation to float, random erasing, then mixup/cutmix with label smoothing (timm).

Every random draw happens inside `rng_scope(key)` with a key per (seed, epoch, rank, batch), so a
batch's augmentation depends on nothing but its key: reruns and resumed runs reproduce it exactly.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing

from dwnet.config import AugmentConfig

from .randaugment import BatchRandAugment, timm_hparams
from .rng import rng_scope

# (x/255 - mean) / std == x * _SCALE + _SHIFT
_SCALE = 1 / (torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255)
_SHIFT = -torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def normalize(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW (any memory layout) -> float32 (x/255 - mean) / std in the requested layout.

    One fused pass (uint8 read, multiply-add, float write straight into the target layout) instead
    of convert, subtract, divide and re-layout: on a CPU-only run this is the loader's main-thread
    cost, and a GPU does it in a quarter of the memory traffic."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
    return torch.addcmul(_SHIFT.to(images.device), images, _SCALE.to(images.device), out=out)


class BatchAugment:
    """The train-time batch augmentations configured by `augment`; each one off at 0 / ""."""

    def __init__(self, augment: AugmentConfig, *, image_size: int, num_classes: int, batch_size: int,
                 device: torch.device) -> None:
        self.device = device
        self.num_classes = num_classes
        self.rand_augment = BatchRandAugment(augment.rand_augment, timm_hparams(image_size, IMAGENET_DEFAULT_MEAN)) \
            if augment.rand_augment else None
        self.random_erasing = RandomErasing(augment.random_erasing, mode="pixel", max_count=1, num_splits=0,
                                            device=device) if augment.random_erasing > 0 else None
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0:
            if batch_size % 2:
                raise ValueError(f"data.batch_size={batch_size} is odd, but mixup/cutmix pair images within a "
                                 "batch and need an even batch; use an even data.batch_size or set "
                                 "augment.mixup=0 and augment.cutmix=0")
            self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=1.0,
                               switch_prob=augment.mixup_switch_prob, mode=augment.mixup_mode,
                               label_smoothing=augment.label_smoothing, num_classes=num_classes)
        self.label_smoothing = augment.label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, key: int,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW images and int labels (on the device) -> (normalised float images, targets):
        (B, num_classes) float soft targets with mixup/cutmix or smoothing, else int64 labels."""
        labels = labels.view(-1).long()
        with rng_scope(key, self.device):
            if self.rand_augment is not None:
                images = self.rand_augment(images)
            x = normalize(images, channels_last)
            if self.random_erasing is not None:
                x = self.random_erasing(x)
            if self.mixup is not None:
                x, targets = self.mixup(x, labels)
            elif self.label_smoothing > 0:
                targets = mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
            else:
                targets = labels.clone()
        if channels_last:  # mixup/erasing keep the layout, but be explicit about the contract
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets
