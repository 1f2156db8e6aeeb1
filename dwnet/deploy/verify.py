"""Runs exported models on a few inputs and measures how far they are from PyTorch."""
from typing import Optional

import torch


def sample_inputs(in_chans: int, size: int, batch: Optional[int], count: int) -> list[torch.Tensor]:
    """`count` seeded normal batches; with a dynamic batch their sizes differ (1, 2, 3, ...)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [batch] * count if batch else list(range(1, count + 1))
    return [torch.randn(b, in_chans, size, size, generator=gen) for b in sizes]


def onnxruntime_outputs(path: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs]


def max_abs_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest elementwise difference over all pairs; inf when a shape differs, NaN if any is NaN."""
    diffs = []
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return float("inf")
        diffs.append((g.detach().float() - e.float()).abs().max())
    return torch.stack(diffs).max().item()
