"""The EMA of the weights, updated only by kept steps without the host reading the verdict."""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3


class StepGatedEma(ModelEmaV3):
    """timm's ModelEmaV3 (same decay schedule, same state_dict, parameters and buffers averaged,
    integer buffers copied) whose update takes the step's skip flag as a device tensor: the
    interpolation weight is multiplied by "kept" (0 or 1), so a skipped step leaves the EMA exactly
    as it was, with one multi-tensor lerp and no host sync."""

    @torch.no_grad()
    def update_unless_skipped(self, model: nn.Module, step: int, skipped: torch.Tensor) -> None:
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers()), strict=True))
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        if any(e.dtype != m.dtype or e.device != m.device for e, m in floats):
            # The model runs in another dtype than its EMA (DeepSpeed's bf16 weights): DeepSpeed has
            # read its overflow flag back already, so reading the verdict costs no extra wait.
            if not bool(skipped):
                self.update(model, step=step)
            return
        kept = (~skipped).to(device=self.device or floats[0][0].device, dtype=torch.float32)
        weight = kept * (1.0 - self.get_decay(step))
        if floats:
            ema_values, model_values = zip(*floats)
            torch._foreach_lerp_(list(ema_values), list(model_values), [weight] * len(ema_values))
        others = [(e, m) for e, m in pairs if not e.is_floating_point()]
        if others:  # integer buffers (num_batches_tracked): the model's are already put back if skipped
            ema_others, model_others = zip(*others)
            torch._foreach_copy_(list(ema_others), list(model_others))
