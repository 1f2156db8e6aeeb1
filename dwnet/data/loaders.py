"""The train and val loaders the engine uses, over either backend (ffcv .beton or ImageFolder)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from dwnet.config import AugmentConfig, DataConfig
from dwnet.errors import DataError

from .augment import BatchAugment, normalize
from .beton_check import check_structure
from .beton_format import IGNORE_LABEL
from .readers import TrainReader, ValReader
from .rng import derive_key
from .sharding import StepLayout, check_enough_samples, steps_per_epoch, train_epoch_indices, val_rank_indices

_EPOCH, _BATCH = 0x45, 0x42


class TrainLoader:
    """Per-rank training micro-batches, each `(images, targets)`: float32 normalised NCHW images on
    the device, and (B, num_classes) soft targets when mixup/cutmix or label smoothing is on, else
    int64 labels.

    The epoch's order does not depend on the number of ranks (see `sharding.py`): `epoch(e,
    start_step=s, layout=L)` yields, for each optimizer step of L (the Trainer's `StepLayout`) from
    s on, this rank's L.accumulation_steps micro-batches of it, reading (and decoding) only those samples. Everything random is a function
    of (seed, epoch) and the sample or micro-batch's place in the epoch, never of the rank layout:
    the same micro-batch gets the same crops, flips and mixup on 1 rank or on 16."""

    def __init__(self, reader: TrainReader, augment: BatchAugment, *, dataset_size: int, batch_size: int,
                 seed: int, rank: int, world_size: int, channels_last: bool) -> None:
        self.reader = reader
        self.augment = augment
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.layout = StepLayout(batch_size, world_size, 1)  # without accumulation, when no run's layout is given

    def _step(self, layout: StepLayout | None) -> StepLayout:
        if layout is None:
            return self.layout
        if (layout.batch_size, layout.world_size) != (self.batch_size, self.world_size):
            raise ValueError(f"{layout} does not fit this loader (batch {self.batch_size}, {self.world_size} ranks)")
        return layout

    def steps_per_epoch(self, layout: StepLayout | None = None) -> int:
        return steps_per_epoch(self.dataset_size, self._step(layout).global_batch)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank without accumulation."""
        return self.steps_per_epoch()

    def epoch_indices(self, epoch: int, start_step: int = 0, layout: StepLayout | None = None) -> np.ndarray:
        """Dataset indices this rank reads in `epoch` from `start_step` on, in order."""
        return train_epoch_indices(self.dataset_size, seed=self.seed, epoch=epoch, layout=self._step(layout),
                                   rank=self.rank, start_step=start_step)

    def epoch(self, epoch: int, start_step: int = 0, *,
              layout: StepLayout | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        layout = self._step(layout)
        accumulation_steps = layout.accumulation_steps
        indices = self.epoch_indices(epoch, start_step, layout)
        epoch_key = derive_key(_EPOCH, self.seed, epoch)  # per-sample crops: independent of rank layout
        batches = self.reader.batches(indices, epoch_key)
        try:
            for position, (images, labels) in enumerate(batches):
                step, micro = divmod(position, accumulation_steps)
                key = derive_key(_BATCH, self.seed, epoch, layout.micro_batch_id(start_step + step, self.rank, micro))
                yield self.augment(images, labels, key=key, channels_last=self.channels_last)
        finally:
            batches.close()


class ValLoader:
    """Per-rank eval batches `(images, labels int64)`. Over all ranks every sample appears exactly
    once with its label; ranks with fewer samples get padding samples labelled -1 (to be ignored),
    so all ranks yield the same number of batches. `num_samples` is the total over all ranks."""

    def __init__(self, reader: ValReader, *, num_samples: int, indices: np.ndarray, real_count: int,
                 channels_last: bool) -> None:
        self.reader = reader
        self.num_samples = num_samples
        self.indices = indices        # dataset indices this rank reads, padding included
        self.real_count = real_count  # this rank's real samples: the first ones it reads
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        position = 0
        for images, labels in self.reader.batches():
            labels = labels.view(-1).long().clone()
            count = labels.shape[0]
            if position + count > self.real_count:
                padding = torch.arange(position, position + count, device=labels.device) >= self.real_count
                labels[padding] = IGNORE_LABEL
            position += count
            yield normalize(images, self.channels_last), labels


def _check_world(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


def beton_size(path: str, split: str) -> int:
    """Samples in the .beton at `path` after its structural check (a one-line DataError names a
    missing, cut-short or foreign file, also when no preflight ran)."""
    if not path:
        raise DataError(f"data.{split}_path is empty; set it to the {split}.beton written by "
                        "`python -m data_prep convert`")
    return check_structure(path, fix=f"check it with `python -m data_prep verify {path}`, then re-copy it or "
                                     "re-convert it").num_samples


def build_train_loader(data: DataConfig, augment: AugmentConfig, *, num_classes: int, rank: int, world_size: int,
                       seed: int, device: torch.device, channels_last: bool = False,
                       layout: StepLayout | None = None) -> TrainLoader:
    """`layout`: the run's optimizer step (the Trainer's), for the check that the data fill one."""
    _check_world(rank, world_size)
    device = torch.device(device)
    batch_augment = BatchAugment(augment, image_size=data.image_size, num_classes=num_classes,
                                 batch_size=data.batch_size, device=device)
    size, reader = _train_source(data, augment, device)
    check_enough_samples(size, layout or StepLayout(data.batch_size, world_size, 1), data.train_path)
    return TrainLoader(reader, batch_augment, dataset_size=size, batch_size=data.batch_size, seed=seed,
                       rank=rank, world_size=world_size, channels_last=channels_last)


def build_val_loader(data: DataConfig, *, rank: int, world_size: int, device: torch.device,
                     channels_last: bool = False) -> ValLoader:
    _check_world(rank, world_size)
    size, open_reader = _val_source(data, torch.device(device))
    indices, real = val_rank_indices(size, rank=rank, world_size=world_size)
    reader = open_reader(indices)
    if size == 0:
        raise DataError(f"data.val_path={data.val_path} holds no samples; point it at a converted val split")
    return ValLoader(reader, num_samples=size, indices=indices, real_count=real, channels_last=channels_last)


# The one place that picks a backend. Each source checks its split once and returns the sample count
# (the sharding needs it first) and a function that opens the reader for the indices it starts with.

def _train_source(data: DataConfig, augment: AugmentConfig, device: torch.device) -> tuple[int, TrainReader]:
    reader_args = dict(image_size=data.image_size, scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip,
                       batch_size=data.batch_size, num_workers=data.num_workers, device=device)
    if data.backend == "ffcv":
        from .ffcv_backend import FfcvTrainReader

        size = beton_size(data.train_path, "train")
        return size, FfcvTrainReader(data.train_path, **reader_args, os_cache=data.os_cache,
                                     batches_ahead=data.batches_ahead)
    from .imagefolder_backend import ImageFolderTrainReader

    reader = ImageFolderTrainReader(data.train_path, **reader_args)  # opening the tree is what counts its samples
    return len(reader), reader


def _val_source(data: DataConfig, device: torch.device) -> tuple[int, Callable[[np.ndarray], ValReader]]:
    reader_args = dict(image_size=data.image_size, crop_pct=data.crop_pct, batch_size=data.batch_size,
                       num_workers=data.num_workers, device=device)
    if data.backend == "ffcv":
        from .ffcv_backend import FfcvValReader

        def open_ffcv(indices: np.ndarray) -> ValReader:
            return FfcvValReader(data.val_path, **reader_args, os_cache=data.os_cache,
                                 batches_ahead=data.batches_ahead, indices=indices)

        return beton_size(data.val_path, "val"), open_ffcv
    from .imagefolder_backend import ImageFolderValReader, open_image_folder

    folder = open_image_folder(data.val_path, "val")
    return len(folder), lambda indices: ImageFolderValReader(folder, **reader_args, indices=indices)
