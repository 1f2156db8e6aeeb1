"""Shared by the tests that spawn ranks or crash a run: a spawned rank's environment, and a crash
at a chosen (epoch, batch)."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch


def set_rank_env(rank: int, world_size: int, port: int, **extra: str) -> None:
    """What a launcher gives a rank (all on 127.0.0.1, CPU), and one thread per rank: the ranks of
    a test share the machine's cores."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", LOCAL_WORLD_SIZE=str(world_size), **extra)
    torch.set_num_threads(1)


class Crash(Exception):
    """A run killed mid-epoch, as far as the trainer can tell."""


def crash_at(epoch: int, batch: int) -> Callable:
    """A loader hook (`poison(epoch, batch, images)` or `observe(epoch, batch)`) that raises Crash
    when micro-batch `batch` of `epoch` comes, and passes the images through otherwise."""
    def hook(seen_epoch: int, seen_batch: int, images=None):
        if (seen_epoch, seen_batch) == (epoch, batch):
            raise Crash()
        return images

    return hook
