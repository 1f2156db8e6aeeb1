"""Images/s of forward and forward+backward at a fixed batch, warm-up excluded, and the device
timing it rests on: the one clock of the package and of `bench/`.

CUDA runs kernels asynchronously, so a host clock read only measures the device's work when the
device has been synchronized on both sides of the timed code.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from dwnet.models import fuse_batchnorm


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


def measure_throughput(model: nn.Module, batch: int, image_size: int, device: torch.device,
                       dtype: torch.dtype = torch.float32, channels_last: bool = False,
                       warmup: int = 3, iters: int = 10, fused: bool = True) -> dict[str, float]:
    """Returns {'inference', 'inference_fused' (if fused), 'train'} in images/s for one process."""
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def images_per_s(step: Callable[[], object]) -> float:
        return batch / seconds_per_call(step, device, iters, warmup)

    results = {}
    model.eval()
    with torch.inference_mode():
        results["inference"] = images_per_s(lambda: model(x))
        if fused:
            fused_model = fuse_batchnorm(copy.deepcopy(model))
            results["inference_fused"] = images_per_s(lambda: fused_model(x))
    model.train()

    def train_step() -> None:
        model(x).float().logsumexp(dim=1).mean().backward()
        model.zero_grad(set_to_none=True)

    results["train"] = images_per_s(train_step)
    return results
