"""The ZeRO-0 optimizer step in a handful of operator calls, whatever the number of parameter tensors.

Without ZeRO, DeepSpeed reduces and clips gradients one parameter tensor at a time (its bucketed
all-reduce flattens, unflattens and copies back per tensor; its fp32 clipping computes one norm
per tensor) and reads the overflow flag back to the host. On a DWNet-T (~200 parameter tensors)
that is thousands of kernel launches per step, more than the model's own forward and backward.

`FusedAdamW` takes those jobs over, each as one multi-tensor operation on the device:
- the data-parallel average: the gradients are copied into one flat buffer, all-reduced once and
  copied back (`torch._foreach_copy_` both ways);
- the global norm (one `torch._foreach_norm`) and the clipping (`clip_grads_with_norm_`);
- the veto of a non-finite step: a device flag (`found_inf`) that torch's fused AdamW kernel reads
  itself, so a skipped step leaves parameters, moments and step counts untouched with no host sync;
- the update: torch's fused AdamW.

`attach` hands the engine to it: DeepSpeed's own gradient all-reduce and fp32 clipping are
switched off for that engine (its `enable_backward_allreduce` flag and a zero `gradient_clipping`
in the generated config), and DeepSpeed sees `overflow = False`, so it never syncs on it either.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dwnet.finite import per_tensor_norms


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together as a float32 0-dim tensor (torch's `get_total_norm`
    also moves every per-tensor norm to one device, an operator call per tensor)."""
    return torch.linalg.vector_norm(per_tensor_norms(tensors))


# How torch's AdamW runs, not what it has learnt: a saved state keeps these of the loading optimizer.
_KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def keep_kernel_flags(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A `load_state_dict` pre-hook: a state saved by another AdamW (a tag of DeepSpeed's own path,
    or from before the fused step, says `fused: None`) must not switch the fused kernel off: the
    device veto (`found_inf`) needs it. Set before the load, the flags also place the step counts
    on the parameters' device, as the kernel wants."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return state_dict  # torch's own check names the mismatch
    groups = [{**saved, **{k: mine[k] for k in _KERNEL_FLAGS if k in mine}}
              for saved, mine in zip(saved_groups, optimizer.param_groups, strict=True)]
    return {**state_dict, "param_groups": groups}


class FusedAdamW(torch.optim.AdamW):
    """AdamW (fused) that averages gradients over the data-parallel ranks, clips them to `max_norm`
    and refuses a non-finite step on the device. `step_skipped` is the last step's verdict, a
    0-dim float device tensor (1.0: not applied); `_global_grad_norm` its pre-clipping norm."""

    overflow = False  # read by DeepSpeed after each step; the real verdict stays on the device

    def __init__(self, params, *, max_norm: float, **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.max_norm = max_norm
        self.world_size = 1
        self.step_skipped: torch.Tensor | None = None
        self._global_grad_norm: torch.Tensor | None = None
        self._flat: tuple[tuple, torch.Tensor, list[torch.Tensor]] | None = None  # (layout, buffer, views)
        self.register_load_state_dict_pre_hook(keep_kernel_flags)

    def attach(self, engine) -> None:
        """Takes gradient averaging over from `engine` (ZeRO-0 only)."""
        engine.enable_backward_allreduce = False
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _average_over_ranks(self, grads: list[torch.Tensor]) -> None:
        if self.world_size == 1:
            return
        layout = tuple((g.shape, g.dtype, g.device) for g in grads)
        if self._flat is None or self._flat[0] != layout:  # one flat buffer and its views per gradient layout
            flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
            views = [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
            self._flat = (layout, flat, views)
        _, flat, views = self._flat
        torch._foreach_copy_(views, grads)
        dist.all_reduce(flat)
        flat.mul_(1.0 / self.world_size)
        torch._foreach_copy_(grads, views)

    @torch.no_grad()
    def step(self, closure=None):
        grads = self._grads()
        self._average_over_ranks(grads)
        norm = total_norm(grads)
        self._global_grad_norm = norm
        if self.max_norm > 0:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        # NaN/Inf anywhere makes the norm non-finite (a vetoed loss was multiplied by NaN on its rank,
        # and the average carried that to every rank): the fused kernel then returns untouched.
        self.step_skipped = (~torch.isfinite(norm)).to(torch.float32)
        self.found_inf = self.step_skipped
        return super().step(closure)
