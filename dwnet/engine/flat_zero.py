"""ZeRO-1/2 with DeepSpeed's partitions and checkpoints, and a step of a few operator calls.

DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`, DeepSpeed 0.19) reduces gradients from
a Python hook on every parameter (about 12 operator calls each), takes the global norm one
parameter at a time in fp64, scans every gradient for Inf/NaN and reads the verdict back to the
host: ~20 launches per parameter tensor, 7-8 host waits per step. Its data layout is already flat:
every parameter of a group is a view of one buffer (`bit16_groups_flat`), each rank owns an fp32
master partition of it (`single_partition_of_fp32_groups`), and its checkpoints, elastic and
universal loading work on that layout.

`FlatZeroStep.install` keeps all of that and replaces the gradient path only (a monkeypatch of one
optimizer instance: its gradient hooks removed, its `step` replaced; nothing class-wide):
- the gradients, accumulated by autograd over the micro-batches, are copied into one flat buffer
  per group laid out like the parameters (`torch._foreach_copy_`) and reduce-scattered, so each
  rank receives the averaged gradient of the partition it owns;
- the global norm is one `_foreach_norm` over the partitions and one all-reduce; clipping one
  `_foreach_mul_`;
- a non-finite norm vetoes the step on the device: torch's fused AdamW reads `found_inf` itself
  and leaves masters, moments and step counts untouched, and the unchanged masters are what is
  gathered back; `step_skipped` is that verdict, unread;
- the updated master partitions are copied into the parameters' flat buffers and all-gathered.

ZeRO-2's gradient partitioning during backward is given up: whole gradients live until the step,
as in ZeRO-1. For the DWNet family that is what DeepSpeed does too (its default 5e8-element
reduce bucket holds a whole DWNet-B's gradients), and `engine.fused_step=false` restores its path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dwnet.errors import UserError
from dwnet.finite import per_tensor_norms

# What the step reads from DeepSpeed's optimizer; checked at install, so a DeepSpeed that renamed
# them fails at start-up with one line, not mid-run.
_ZERO_ATTRIBUTES = ("bit16_groups_flat", "round_robin_bit16_groups", "round_robin_bit16_offsets",
                    "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "partition_size",
                    "real_dp_process_group", "_grad_acc_hooks", "cpu_offload", "optimizer")

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class UnsupportedZeroOptimizer(UserError):
    """This DeepSpeed or configuration is not what the flat step was written for; one line that
    names what differs and `engine.fused_step=false` (DeepSpeed's own step)."""


@dataclass
class _Group:
    """One parameter group's buffers: the gradients laid out like `params_flat`, the partition of
    them this rank receives, and the views the step copies through (made once: each view is an
    operator call)."""
    params: list[torch.nn.Parameter]
    params_flat: torch.Tensor
    params_partition: torch.Tensor
    master: torch.Tensor
    grads_flat: torch.Tensor
    grad_views: list[torch.Tensor]
    grads_partition: torch.Tensor

    def stale(self, zero, i: int, rank: int) -> bool:
        """True after DeepSpeed rebound a buffer (e.g. loading a checkpoint)."""
        return (zero.bit16_groups_flat[i] is not self.params_flat
                or zero.single_partition_of_fp32_groups[i] is not self.master
                or zero.parallel_partitioned_bit16_groups[i][rank] is not self.params_partition)


class FlatZeroStep:
    """The step of one DeepSpeed ZeRO-1/2 optimizer, installed by `install`."""

    def __init__(self, zero, max_norm: float) -> None:
        self.zero = zero
        self.max_norm = max_norm
        group = zero.real_dp_process_group[0]
        self.group = group
        self.world_size = dist.get_world_size(group=group)
        self.rank = dist.get_rank(group=group)
        self.step_skipped: torch.Tensor | None = None  # 0-dim float on the device, 1.0: not applied
        self._groups: list[_Group] = []

    @classmethod
    def install(cls, engine, max_norm: float) -> FlatZeroStep:
        """Takes the gradient path of `engine`'s ZeRO-1/2 optimizer over (see the module doc)."""
        zero = engine.optimizer
        missing = [name for name in _ZERO_ATTRIBUTES if not hasattr(zero, name)]
        if missing:
            raise UnsupportedZeroOptimizer(
                f"{type(zero).__name__} has no {', '.join(missing)}: this DeepSpeed's ZeRO optimizer is not the "
                "one dwnet's flat ZeRO step was written for; set engine.fused_step=false")
        base = zero.optimizer
        if zero.cpu_offload or not (isinstance(base, torch.optim.AdamW) and base.defaults.get("fused")):
            raise UnsupportedZeroOptimizer("the flat ZeRO step needs a fused torch AdamW on the device and no "
                                           "offload; set engine.fused_step=false")
        if any(g is not zero.real_dp_process_group[0] for g in zero.real_dp_process_group):
            raise UnsupportedZeroOptimizer("the flat ZeRO step needs one data-parallel group for all parameter "
                                           "groups (no MoE); set engine.fused_step=false")
        if any(flat.dtype != torch.float32 for flat in zero.bit16_groups_flat):
            raise UnsupportedZeroOptimizer("the flat ZeRO step needs fp32 parameters (bf16 runs as autocast over "
                                           "them); set engine.fused_step=false")
        for hook in zero._grad_acc_hooks:
            hook.remove()
        zero._grad_acc_hooks.clear()
        engine.enable_backward_allreduce = False
        step = cls(zero, max_norm)
        zero.step = step.step  # this instance only: engine.step() calls optimizer.step()
        return step

    def _layout(self) -> list[_Group]:
        z = self.zero
        if len(self._groups) != len(z.bit16_groups_flat) or any(
                g.stale(z, i, self.rank) for i, g in enumerate(self._groups)):
            self._groups = [self._group(i) for i in range(len(z.bit16_groups_flat))]
        return self._groups

    def _group(self, i: int) -> _Group:
        z = self.zero
        params_flat = z.bit16_groups_flat[i]
        params = list(z.round_robin_bit16_groups[i])
        grads_flat = torch.zeros_like(params_flat)  # the alignment padding stays zero
        views = [grads_flat.narrow(0, offset, p.numel()).view_as(p)
                 for p, offset in zip(params, z.round_robin_bit16_offsets[i], strict=True)]
        for p, offset in zip(params, z.round_robin_bit16_offsets[i], strict=True):
            if p.data_ptr() != params_flat[offset:].data_ptr():
                raise UnsupportedZeroOptimizer("a parameter is not a view of DeepSpeed's flat buffer where its "
                                               "offset says; set engine.fused_step=false")
        partition = z.partition_size[i]
        grads_partition = (grads_flat if self.world_size == 1
                           else torch.empty(partition, dtype=grads_flat.dtype, device=grads_flat.device))
        return _Group(params=params, params_flat=params_flat,
                      params_partition=z.parallel_partitioned_bit16_groups[i][self.rank],
                      master=z.single_partition_of_fp32_groups[i], grads_flat=grads_flat, grad_views=views,
                      grads_partition=grads_partition)

    def _reduce(self, groups: list[_Group]) -> list[torch.Tensor]:
        """Each rank's partition of the gradients, averaged over the ranks; whole gradients freed."""
        for g in groups:
            grads = [p.grad for p in g.params]
            present = [(v, t) for v, t in zip(g.grad_views, grads, strict=True) if t is not None]
            if len(present) != len(grads):  # a parameter the loss did not reach: a zero gradient
                torch._foreach_zero_([v for v, t in zip(g.grad_views, grads, strict=True) if t is None])
            if present:
                torch._foreach_copy_([v for v, _ in present], [t for _, t in present])
            for p in g.params:
                p.grad = None
            if self.world_size > 1:
                _reduce_scatter(g.grads_partition, g.grads_flat, group=self.group)
        partitions = [g.grads_partition for g in groups]
        if self.world_size > 1:
            torch._foreach_mul_(partitions, 1.0 / self.world_size)
        return partitions

    def _global_norm(self, partitions: list[torch.Tensor]) -> torch.Tensor:
        # In fp64, as DeepSpeed's norms are: CPU's fp32 norm of a flat partition of a million
        # gradients drifts by 1e-4 relative (per-tensor norms, as FusedAdamW takes, do not).
        squares = per_tensor_norms(partitions, 2.0, dtype=torch.float64).square().sum()
        if self.world_size > 1:
            dist.all_reduce(squares, group=self.group)
        return squares.sqrt().float()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        z = self.zero
        groups = self._layout()
        partitions = self._reduce(groups)
        norm = self._global_norm(partitions)
        if self.max_norm > 0:
            torch._foreach_mul_(partitions, (self.max_norm / (norm + 1e-6)).clamp(max=1.0))
        # A NaN/Inf anywhere, on any rank, makes every rank's norm non-finite: all refuse alike.
        self.step_skipped = (~torch.isfinite(norm)).to(torch.float32)
        for g, partition in zip(groups, partitions, strict=True):
            g.master.grad = partition
        z.optimizer.found_inf = self.step_skipped
        z.optimizer.step()
        for g in groups:
            g.master.grad = None
        z._lazy_init_hp_params_optimizer_state()  # DeepSpeed links its state views after the first step
        torch._foreach_copy_([g.params_partition for g in groups], [g.master for g in groups])
        if self.world_size > 1:
            for g in groups:
                _all_gather(g.params_flat, g.params_partition, group=self.group)
        z.overflow = False  # DeepSpeed reads it on the host; the verdict stays on the device
        z._global_grad_norm = norm
