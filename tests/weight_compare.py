"""Comparing two trainings' weights where only the order of floating-point sums differs.

Where a gradient is (nearly) zero its rounding noise is all there is, and Adam scales that up to a
full-size step: the biases of convolutions that feed a BatchNorm directly (`CANCELLED_BIAS`, which
the BatchNorm cancels: tests/test_elastic.py proves it) differ by design, and so does the running
mean of that BatchNorm (`TRACKS_BIAS`), which tracks the bias's drift and cancels it at eval."""
from __future__ import annotations

import torch

CANCELLED_BIAS = "attn2conv.conv.bias"
TRACKS_BIAS = "attn2conv.bn.running_mean"  # the BatchNorm fed by CANCELLED_BIAS


def trained_parameters(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the parameters a comparison holds to a tolerance (no statistics, no cancelled bias)."""
    return [k for k in state if "running" not in k and "num_batches" not in k and not k.endswith(CANCELLED_BIAS)]


def running_statistics(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var")) and not k.endswith(TRACKS_BIAS)]


def beyond(first: dict, second: dict, keys: list[str], tolerance: float) -> tuple[int, int, float]:
    """(elements differing by more than `tolerance`, elements compared, largest difference)."""
    diffs = torch.cat([(first[k].float() - second[k].float()).abs().flatten() for k in keys])
    return int((diffs > tolerance).sum()), diffs.numel(), diffs.max().item()
