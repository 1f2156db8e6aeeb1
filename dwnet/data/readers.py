"""What the loaders need from a backend's readers (ffcv_backend.py, imagefolder_backend.py): uint8
NCHW images and integer labels, on the loader's device, in the order asked for. Sharding, the
random streams' keys and the augmentations stay in the loaders, so both backends give the same
batches."""
from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

import numpy as np
import torch

Batches = Generator[tuple[torch.Tensor, torch.Tensor], None, None]  # a generator: the loader close()s it early


class TrainReader(Protocol):
    def batches(self, indices: np.ndarray, epoch_key: int) -> Batches:
        """Batches of the samples `indices` (whole batches), cropped and flipped with the
        per-sample streams of `epoch_key`."""
        ...


class ValReader(Protocol):
    def __len__(self) -> int:
        """Batches per pass."""
        ...

    def batches(self) -> Batches:
        """One pass over the indices the reader was built for, in order."""
        ...
