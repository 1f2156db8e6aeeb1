"""In-memory loaders with the TrainLoader / ValLoader interface of dwnet.data, for engine tests
that must not depend on image decoding: a learnable synthetic 10-class problem."""
from __future__ import annotations

import torch

from dwnet.data.sharding import StepLayout, steps_per_epoch, train_epoch_indices


def synthetic_dataset(n: int = 256, size: int = 32, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.randn(n, 3, size, size, generator=gen) * 0.5
    for c in range(classes):  # class-dependent brightness in one channel and one half: learnable
        images[labels == c, c % 3, :, : size // 2] += 1.5 * (c + 1) / classes
    return images, labels


class TensorTrainLoader:
    """dwnet.data.TrainLoader's interface and sample order (the shared `sharding` layout) over
    in-memory tensors, without augmentation."""

    def __init__(self, images, labels, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 poison=None):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.dataset_size = len(images)
        self.poison = poison  # optional callable(epoch, micro_batch_index, images) -> images
        self.layout = StepLayout(batch_size, world_size, 1)

    def steps_per_epoch(self, layout: StepLayout | None = None) -> int:
        return steps_per_epoch(self.dataset_size, (layout or self.layout).global_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def epoch(self, epoch: int, start_step: int = 0, *, layout: StepLayout | None = None):
        layout = layout or self.layout
        accumulation_steps = layout.accumulation_steps
        mine = torch.from_numpy(train_epoch_indices(self.dataset_size, seed=self.seed, epoch=epoch, layout=layout,
                                                    rank=self.rank, start_step=start_step))
        for position, idx in enumerate(mine.split(self.batch_size), start=start_step * accumulation_steps):
            images = self.images[idx]
            if self.poison is not None:
                images = self.poison(epoch, position, images)
            yield images, self.labels[idx]


class TensorValLoader:
    def __init__(self, images, labels, batch_size: int, rank: int = 0, world_size: int = 1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.num_samples = len(images)

    def __iter__(self):
        for b in range(0, len(self.images), self.batch_size):
            yield self.images[b:b + self.batch_size], self.labels[b:b + self.batch_size]
