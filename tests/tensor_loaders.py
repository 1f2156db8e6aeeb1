"""In-memory loaders with the TrainLoader / ValLoader interface of dwnet.data, for engine tests
that must not depend on image decoding: a learnable synthetic 10-class problem."""
from __future__ import annotations

import torch


def synthetic_dataset(n: int = 256, size: int = 32, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.randn(n, 3, size, size, generator=gen) * 0.5
    for c in range(classes):  # class-dependent brightness in one channel and one half: learnable
        images[labels == c, c % 3, :, : size // 2] += 1.5 * (c + 1) / classes
    return images, labels


class TensorTrainLoader:
    """Deterministic per (seed, epoch); each rank takes every world_size-th sample of the order."""

    def __init__(self, images, labels, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 poison=None):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_samples = len(images) // world_size
        self.poison = poison  # optional callable(epoch, batch_index, images) -> images

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        mine = order[self.rank::self.world_size][: self.num_samples]
        for b in range(start_batch, len(self)):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[idx]
            if self.poison is not None:
                images = self.poison(epoch, b, images)
            yield images, self.labels[idx]


class TensorValLoader:
    def __init__(self, images, labels, batch_size: int, rank: int = 0, world_size: int = 1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.num_samples = len(images)

    def __iter__(self):
        for b in range(0, len(self.images), self.batch_size):
            yield self.images[b:b + self.batch_size], self.labels[b:b + self.batch_size]
