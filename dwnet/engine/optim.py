"""AdamW with the published parameter groups, LR scaling and the warmup + cosine schedule."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from dwnet.config import OptimConfig

from .fused_step import FusedAdamW, keep_kernel_flags


@dataclass(frozen=True)
class ScaledLRs:
    base: float
    warmup: float
    min: float


def scaled_lrs(optim: OptimConfig, global_batch: int) -> ScaledLRs:
    """Linear scaling rule: every LR is multiplied by global batch (incl. accumulation) / reference."""
    factor = global_batch / optim.lr_reference_batch
    return ScaledLRs(optim.base_lr * factor, optim.warmup_lr * factor, optim.min_lr * factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, always in this order: decayed weights, and undecayed norms / biases / 1-D params /
    no_weight_decay(). timm's rule sorts the parameters."""
    # timm drops the split when weight_decay is 0 and omits empty groups; sorting with a nonzero
    # placeholder keeps two groups in a fixed order, so the optimizer-state layout never changes.
    placeholder = 1.0
    split = {group["weight_decay"]: group["params"] for group in param_groups_weight_decay(
        model, placeholder, no_weight_decay_list=set(getattr(model, "no_weight_decay", set)()))}
    return [
        {"params": split.get(placeholder, []), "weight_decay": weight_decay, "name": "decay"},
        {"params": split.get(0.0, []), "weight_decay": 0.0, "name": "no_decay"},
    ]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a step whose gradients are not finite, and says so via `overflow`.

    DeepSpeed's ZeRO and bf16 optimizers already skip such steps and expose `overflow`; this is the
    inner optimizer they wrap, and it refuses such a step itself too, so the guarantee (no parameter
    or optimizer-state change) never rests on one check. DeepSpeed reads `overflow` to count the
    step as skipped. With the fused step (ZeRO 0-2, fp32/bf16: `uses_fused_step`) it is not used.
    """

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        self.overflow = not bool(finite)
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, optim: OptimConfig, lrs: ScaledLRs, fused_step: bool = False,
                    zero_stage: int = 0) -> torch.optim.AdamW:
    """With the fused step: `FusedAdamW` without ZeRO (it averages and clips at optim.grad_clip
    itself), torch's fused AdamW inside ZeRO-1/2 (`FlatZeroStep` averages, clips and sets its
    `found_inf`). Otherwise `GuardedAdamW` inside DeepSpeed's ZeRO / low-precision optimizer."""
    groups = param_groups(model, optim.weight_decay)
    if fused_step and zero_stage == 0:
        return FusedAdamW(groups, max_norm=optim.grad_clip, lr=lrs.base, betas=optim.betas, eps=optim.eps)
    if fused_step:
        inner = torch.optim.AdamW(groups, lr=lrs.base, betas=optim.betas, eps=optim.eps, fused=True)
        inner.register_load_state_dict_pre_hook(keep_kernel_flags)  # DeepSpeed's ZeRO loads its state
        return inner
    return GuardedAdamW(groups, lr=lrs.base, betas=optim.betas, eps=optim.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, lrs: ScaledLRs,
                    steps_per_epoch: int) -> CosineLRScheduler:
    """Per-optimizer-step schedule: linear warmup from warmup LR, then cosine down to min LR.

    Drive it with `scheduler.step_update(num_updates)` after each optimizer step.
    """
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
    total_steps = optim.epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=lrs.min,
        warmup_lr_init=lrs.warmup, warmup_t=warmup_steps, warmup_prefix=True,
        cycle_limit=1, t_in_epochs=False)
