"""Which samples each rank reads, per epoch. Computed here (not by ffcv's `distributed=True`) so that:

* train: the order does not depend on the number of ranks. An epoch is one permutation of the
  dataset per (seed, epoch); optimizer step s consumes the next `global_batch` samples of it, cut
  into `global_batch / batch_size` micro-batch *slots*; rank r at accumulation micro-step a takes
  slot `a * world_size + r`. A run on W ranks with accumulation A and one on W' ranks with A'
  (W * A = W' * A') therefore compute every step from the same micro-batches, and a run resumed on
  another number of ranks continues the epoch at the next step's slots, with no sample repeated or
  skipped. Steps per epoch = N // global_batch; the partial step at the end (a different one each
  epoch) is dropped.
* val: rank r takes samples r, r+W, r+2W, ...; ranks short of ceil(N/W) samples repeat one of their
  own samples as padding that the loader labels -1, so all ranks run the same number of batches
  (ZeRO-3 forwards are collective) and every sample is counted exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwnet.config import ConfigError, RunConfig

from .rng import derive_key

_SHUFFLE = 0x5348


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's global batch is cut into micro-batches and dealt to the ranks."""
    batch_size: int  # samples per micro-batch (data.batch_size)
    world_size: int
    accumulation_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, world_size: int) -> StepLayout:
        """The optimizer step of `cfg` on `world_size` ranks."""
        return cls(cfg.data.batch_size, world_size, cfg.optim.accumulation_steps)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: the one formula of the global batch."""
        return self.batch_size * self.world_size * self.accumulation_steps

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step, over all ranks."""
        return self.world_size * self.accumulation_steps

    def slot(self, rank: int, micro_step: int) -> int:
        return micro_step * self.world_size + rank

    def micro_batch_id(self, step_in_epoch: int, rank: int, micro_step: int) -> int:
        """The micro-batch's position in the epoch, the same for every layout of the same global
        batch: what its augmentation and the model's random draws (drop-path) are keyed on."""
        return step_in_epoch * self.slots + self.slot(rank, micro_step)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


def check_enough_samples(num_samples: int, layout: StepLayout, train_path: str) -> None:
    """ConfigError unless `num_samples` fill at least one optimizer step of `layout`."""
    batch, world = layout.batch_size, layout.world_size
    if num_samples < batch * world:
        raise ConfigError(f"data.batch_size={batch} is larger than a rank's share of data.train_path="
                          f"{train_path} ({num_samples} samples over {world} rank(s): {num_samples // world} each); "
                          f"lower data.batch_size to at most {max(1, num_samples // world)}")
    if steps_per_epoch(num_samples, layout.global_batch) == 0:
        raise ConfigError(
            f"data.train_path={train_path}: {num_samples} samples, fewer than one global batch of "
            f"{layout.global_batch} (data.batch_size={batch} x {world} ranks x "
            f"optim.accumulation_steps={layout.accumulation_steps}); lower data.batch_size or "
            "optim.accumulation_steps")


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_key(_SHUFFLE, seed, epoch)).permutation(num_samples)


def train_epoch_indices(num_samples: int, *, seed: int, epoch: int, layout: StepLayout, rank: int,
                        start_step: int = 0) -> np.ndarray:
    """This rank's sample indices for steps `start_step`.. of the epoch, in reading order: per step,
    its `accumulation_steps` micro-batches of `batch_size` samples."""
    steps = steps_per_epoch(num_samples, layout.global_batch)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside this epoch's 0..{steps} steps")
    used = epoch_permutation(num_samples, seed=seed, epoch=epoch)[:steps * layout.global_batch]
    by_slot = used.reshape(steps, layout.slots, layout.batch_size)
    mine = [layout.slot(rank, micro) for micro in range(layout.accumulation_steps)]
    return by_slot[start_step:, mine, :].reshape(-1).astype(np.int64)


def val_rank_indices(num_samples: int, *, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """(indices padded to ceil(N / world_size), number of real samples at the front)."""
    own = np.arange(rank, num_samples, world_size, dtype=np.int64)
    padded_length = -(-num_samples // world_size)
    filler = own[0] if own.size else 0
    padding = np.full(padded_length - own.size, filler, dtype=np.int64)
    return np.concatenate([own, padding]), int(own.size)
