"""Images/s of forward and forward+backward at a fixed batch, warm-up excluded."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from dwnet.models import fuse_batchnorm


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(step, batch: int, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def measure_throughput(model: nn.Module, batch: int, image_size: int, device: torch.device,
                       dtype: torch.dtype = torch.float32, channels_last: bool = False,
                       warmup: int = 3, iters: int = 10, fused: bool = True) -> dict[str, float]:
    """Returns {'inference', 'inference_fused' (if fused), 'train'} in images/s for one process."""
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = {}
    model.eval()
    with torch.inference_mode():
        results["inference"] = _images_per_s(lambda: model(x), batch, device, warmup, iters)
        if fused:
            fused_model = fuse_batchnorm(copy.deepcopy(model))
            results["inference_fused"] = _images_per_s(lambda: fused_model(x), batch, device, warmup, iters)
    model.train()

    def train_step() -> None:
        model(x).float().logsumexp(dim=1).mean().backward()
        model.zero_grad(set_to_none=True)

    results["train"] = _images_per_s(train_step, batch, device, warmup, iters)
    return results
