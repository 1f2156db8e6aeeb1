"""Which samples each rank reads, per epoch. Computed here (not by ffcv's `distributed=True`) so that:

* train: one permutation of the whole dataset per (seed, epoch), shared by all ranks, is cut into
  disjoint per-rank shards of whole batches (DistributedSampler with drop_last=True, then dropping
  the partial batch): every rank runs the same number of steps, and a resumed run can slice the
  epoch at any batch without decoding what it skips;
* val: rank r takes samples r, r+W, r+2W, ...; ranks short of ceil(N/W) samples repeat one of their
  own samples as padding that the loader labels -1, so all ranks run the same number of batches
  (ZeRO-3 forwards are collective) and every sample is counted exactly once.
"""
from __future__ import annotations

import numpy as np

from .rng import derive_key

_SHUFFLE = 0x5348


def train_batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return (num_samples // world_size) // batch_size


def train_epoch_indices(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                        batch_size: int) -> np.ndarray:
    """This rank's sample indices for the epoch, in reading order (length = batches * batch_size)."""
    permutation = np.random.default_rng(derive_key(_SHUFFLE, seed, epoch)).permutation(num_samples)
    per_rank = num_samples // world_size
    take = train_batches_per_epoch(num_samples, world_size, batch_size) * batch_size
    return permutation[:per_rank * world_size][rank::world_size][:take].astype(np.int64)


def val_rank_indices(num_samples: int, *, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """(indices padded to ceil(N / world_size), number of real samples at the front)."""
    own = np.arange(rank, num_samples, world_size, dtype=np.int64)
    padded_length = -(-num_samples // world_size)
    filler = own[0] if own.size else 0
    padding = np.full(padded_length - own.size, filler, dtype=np.int64)
    return np.concatenate([own, padding]), int(own.size)
