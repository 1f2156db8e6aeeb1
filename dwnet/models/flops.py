"""FLOP counting with PyTorch's own dispatcher-level counter (no extra dependency)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass for a single image (the 'GFLOPs' papers quote).

    Counts convolutions and matrix products, which is what published DWNet/Swin figures count.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
