"""Validation: top-1 / top-5 / loss summed over every rank, each sample counted once."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dwnet.data.beton_format import IGNORE_LABEL  # the val loader's padding samples


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, input_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Runs `forward` over `batches`; returns {'top1', 'top5', 'loss', 'samples'} over all ranks."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for images, labels in batches:
        logits = forward(images.to(device=device, dtype=input_dtype)).float()
        labels = labels.to(device)
        keep = labels != IGNORE_LABEL
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            continue
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(labels[:, None])
        totals[0] += hits[:, :1].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[3] += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / count, "top5": 100.0 * totals[1].item() / count,
            "loss": totals[2].item() / count, "samples": int(totals[3].item())}
