"""ffcv readers for the train and val loaders: decode + crop (+ flip) in ffcv's numba threads,
to the device, as uint8 NCHW batches in the order the caller asks for.

Both run ffcv non-distributed over index lists computed in `sharding.py` (ffcv's distributed mode
shuffles and pads its own way, and cannot start an epoch part-way through); the train reader swaps in
a traversal order that replays the indices given for each epoch, so a resumed epoch never decodes
the batches it skips.

The readers take a path that already passed the structural check (`beton_check.check_structure`,
run by the loaders' `beton_size`), so they do not look at the file again.
"""
from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

from .beton_format import IMAGE, LABEL
from .ffcv_ops import CenterCropDecoder, SeededRandomResizedCropDecoder
from .readers import Batches


def _run_epoch(loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterates one ffcv epoch; if the consumer stops early, stops ffcv's prefetch thread and waits
    for it (it notices within a few batches) so no thread outlives its epoch: a thread parked after
    its loader was dropped makes numba's clean-up of the loader's compiled code fail noisily."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        iterator.close()  # the thread checks this flag whenever the output queue is full
        while iterator.is_alive():
            iterator.join(timeout=0.6)
            with contextlib.suppress(queue.Empty):  # unblock a thread parked on its final put
                iterator.output_queue.get_nowait()


class _ReplayOrder(TraversalOrder):
    """Traversal order that returns whatever index array was set for the coming epoch."""

    def __init__(self, loader: Loader) -> None:
        super().__init__(loader)
        self.order = np.asarray(loader.indices)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order


def _workers(requested: int) -> int:
    # ffcv hands this to numba.set_num_threads, which rejects more than NUMBA_NUM_THREADS (the core
    # count by default); 0 means "all cores" as in ffcv
    limit = numba.config.NUMBA_NUM_THREADS
    return limit if requested <= 0 else min(requested, limit)


def _tail(device: torch.device) -> list:
    """ffcv ops after decoding: to the accelerator when there is one (ffcv copies asynchronously on
    its own CUDA streams), then NHWC -> NCHW view (channels_last memory, no copy)."""
    ops = [ToTensor()]
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [ToTorchImage(channels_last=True)]


def _label_pipeline(device: torch.device) -> list:
    ops = [IntDecoder(), ToTensor()]  # (B, 1); flattened by the caller
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


class FfcvTrainReader:
    def __init__(self, path: str, *, image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 hflip: float, batch_size: int, num_workers: int, os_cache: bool, batches_ahead: int,
                 device: torch.device) -> None:
        self.decoder = SeededRandomResizedCropDecoder((image_size, image_size), scale, ratio, hflip)
        self.loader = Loader(path, batch_size=batch_size, num_workers=_workers(num_workers), os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, drop_last=True,
                             batches_ahead=batches_ahead, distributed=False,
                             pipelines={IMAGE: [self.decoder, *_tail(device)], LABEL: _label_pipeline(device)})
        self.loader.traversal_order = _ReplayOrder(self.loader)

    def batches(self, indices: np.ndarray, epoch_key: int) -> Batches:
        """uint8 NCHW images and int64 labels for `indices` (a multiple of the batch size), cropped
        and flipped with the per-sample streams of `epoch_key`."""
        if indices.size == 0:
            return
        self.decoder.set_epoch_key(epoch_key)
        self.loader.traversal_order.order = np.asarray(indices, dtype=np.int64)
        yield from _run_epoch(self.loader)


class FfcvValReader:
    def __init__(self, path: str, *, image_size: int, crop_pct: float, batch_size: int, num_workers: int,
                 os_cache: bool, batches_ahead: int, device: torch.device, indices: np.ndarray) -> None:
        decoder = CenterCropDecoder((image_size, image_size), ratio=crop_pct)
        self.loader = Loader(path, batch_size=batch_size, num_workers=_workers(num_workers), os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False,
                             batches_ahead=batches_ahead, distributed=False,
                             pipelines={IMAGE: [decoder, *_tail(device)], LABEL: _label_pipeline(device)})

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self) -> Batches:
        yield from _run_epoch(self.loader)
