"""Images/s of forward and forward+backward at a fixed batch, warm-up excluded (timed with
`dwnet.timing`, the one clock of the package and of `bench/`)."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from dwnet.models import fuse_batchnorm
from dwnet.timing import seconds_per_call


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
