"""Device timing: the one clock of the package and of `bench/`.

CUDA runs kernels asynchronously, so a host clock read only measures the device's work when the
device has been synchronized on both sides of the timed code. Importing this loads neither
DeepSpeed nor the models.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import torch


def synchronize(device: torch.device | str) -> None:
    """Waits for the work queued on `device` (a no-op off CUDA: CPU ops finish before they return)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Elapsed:
    """Wall seconds of a `timed` block; set when the block ends."""
    seconds: float = 0.0


@contextmanager
def timed(device: torch.device | str) -> Iterator[Elapsed]:
    """Times the block, device work included: synchronizes on entry (work queued earlier is not
    charged to the block) and on exit (the block's own work is)."""
    elapsed = Elapsed()
    synchronize(device)
    start = time.perf_counter()
    yield elapsed
    synchronize(device)
    elapsed.seconds = time.perf_counter() - start


def seconds_per_call(fn: Callable[[], object], device: torch.device | str, iters: int, warmup: int = 0) -> float:
    """Mean wall seconds of `iters` calls of `fn`, device work included, after `warmup` untimed
    calls (allocator, oneDNN primitive caches, cudnn autotuning, compilation)."""
    for _ in range(warmup):
        fn()
    with timed(device) as elapsed:
        for _ in range(iters):
            fn()
    return elapsed.seconds / iters
