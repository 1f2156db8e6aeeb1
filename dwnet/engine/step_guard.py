"""Makes a non-finite optimizer step change nothing, on every rank.

What a step can change, and how each is protected when the step is skipped:
- parameters and optimizer state: the update is vetoed through DeepSpeed's own overflow check.
  A rank that saw a non-finite loss or BatchNorm statistic multiplies its last micro-batch's loss
  by NaN, so its gradients are non-finite; gradients are reduced over ranks before any optimizer
  step, so every rank's overflow check (ZeRO 1-3, bf16) or GuardedAdamW (fp32 ZeRO-0) refuses
  the same update. This also catches a *finite* loss whose activations overflowed a BN statistic.
- BatchNorm running statistics and `num_batches_tracked` (and any other buffer): written by the
  forward pass itself, before anything can be checked. They are copied at the start of the step
  (before its first micro-batch) and copied back on every rank when the step is skipped.
- EMA: updated only after a step is known to be kept.
The decision is one all-reduced flag vector, so ranks cannot disagree about a skip.

Skipping is for bad luck; `SkipWindow` decides when it is not enough: `max_skips` skips within
`window` steps mean the run is unstable, and `end()`'s verdict asks for a rollback.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
import torch.nn as nn

from dwnet.finite import all_finite


class Verdict(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    ROLLBACK = "rollback"  # too many skips in the window: reload the last clean checkpoint


class SkipWindow:
    """Skipped optimizer steps in a sliding window of the last `window` steps.

    While the window holds any skip a non-finite *episode* is open: checkpoints written then are
    not rollback targets, since the weights may already be drifting towards the divergence.
    """

    def __init__(self, max_skips: int, window: int) -> None:
        self.max_skips = max_skips
        self.window = window
        self.skipped_steps: deque[int] = deque()
        self.total_skipped = 0

    def _expire(self, step: int) -> None:
        while self.skipped_steps and self.skipped_steps[0] <= step - self.window:
            self.skipped_steps.popleft()

    def record(self, step: int, applied: bool) -> Verdict:
        """The window keeps its skips after a ROLLBACK verdict (the messages count them); `reset`
        once the rollback is done."""
        self._expire(step)
        if applied:
            return Verdict.OK
        self.skipped_steps.append(step)
        self.total_skipped += 1
        return Verdict.ROLLBACK if len(self.skipped_steps) >= self.max_skips else Verdict.SKIPPED

    def skips_in_window(self, step: int) -> int:
        self._expire(step)
        return len(self.skipped_steps)

    def open_episode(self, step: int) -> list[int]:
        """The skips of the episode open at `step` (empty when none is)."""
        self._expire(step)
        return list(self.skipped_steps)

    def first_skip(self) -> int | None:
        """The step that opened the current episode, if one is open."""
        return self.skipped_steps[0] if self.skipped_steps else None

    def carry_over(self, steps: list[int]) -> None:
        """Reopens the episode a checkpoint was saved in: a crash does not close it."""
        self.skipped_steps.extend(steps)

    def reset(self) -> None:
        self.skipped_steps.clear()


@dataclass(frozen=True)
class StepOutcome:
    skipped: bool
    loss_ranks: int = 0  # ranks whose loss (any micro-batch) was not finite
    buffer_ranks: int = 0  # ranks whose BatchNorm statistics were not finite
    world_size: int = 1
    verdict: Verdict = Verdict.OK
    skips_in_window: int = 0

    def reason(self) -> str:
        parts = []
        if self.loss_ranks:
            parts.append(f"non-finite loss on {self.loss_ranks} of {self.world_size} ranks")
        if self.buffer_ranks:
            parts.append(f"non-finite BatchNorm statistics on {self.buffer_ranks} of {self.world_size} ranks")
        return ", ".join(parts) or "non-finite gradient (norm)"


class BufferSnapshot:
    """A copy of every buffer of a module, taken and put back with one foreach copy each way."""

    def __init__(self) -> None:
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def capture(self, module: nn.Module) -> None:
        # Listed afresh each time: a rebuilt engine (precision fallback) brings new buffer tensors.
        live = list(module.buffers())
        if [(t.shape, t.dtype, t.device) for t in live] != [(t.shape, t.dtype, t.device) for t in self._saved]:
            self._saved = [t.detach().clone() for t in live]
        elif live:
            torch._foreach_copy_(self._saved, live)
        self._live = live

    def restore(self) -> None:
        if self._live:
            torch._foreach_copy_(self._live, self._saved)

    def floating(self) -> list[torch.Tensor]:
        return [t for t in self._live if t.is_floating_point()]


class StepGuard:
    """Per optimizer step: `begin` before the first micro-batch, `loss_for_backward` on each
    micro-batch's loss, `end` after the engine stepped at the accumulation boundary."""

    def __init__(self, world_size: int, max_skips: int, window: int) -> None:
        self.world_size = world_size
        self.window = SkipWindow(max_skips, window)
        self.snapshot = BufferSnapshot()
        self._losses_finite: torch.Tensor | None = None
        self._buffers_finite: torch.Tensor | None = None

    def begin(self, module: nn.Module) -> None:
        self.snapshot.capture(module)
        self._losses_finite = None
        self._buffers_finite = None

    def loss_for_backward(self, loss: torch.Tensor, last_micro_batch: bool) -> torch.Tensor:
        """`loss` itself, except on the step's last micro-batch when something was not finite:
        then a loss whose gradients are NaN, so that no rank applies this step (device-side: no sync)."""
        finite = torch.isfinite(loss.detach())
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        if not last_micro_batch:
            return loss
        # After the last forward of the step: BN statistics are final for this step (backward
        # does not touch them), and a poisoned statistic stays poisoned through later momentum updates.
        self._buffers_finite = all_finite(self.snapshot.floating()).to(loss.device)
        keep = self._losses_finite & self._buffers_finite
        return loss * torch.where(keep, 1.0, float("nan")).to(loss.dtype)

    def end(self, applied: bool, step: int) -> StepOutcome:
        """Collective. Decides the step on all ranks at once; restores the buffers if skipped, and
        says whether the skips have become too many (`StepOutcome.verdict`)."""
        if self._losses_finite is None or self._buffers_finite is None:
            raise RuntimeError("StepGuard.end() without loss_for_backward(last_micro_batch=True) this step")
        flags = torch.stack([~self._losses_finite, ~self._buffers_finite,
                             torch.tensor(not applied, device=self._losses_finite.device)]).to(torch.float32)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flags)
        loss_ranks, buffer_ranks, unapplied_ranks = (int(v) for v in flags.tolist())
        skipped = bool(loss_ranks or buffer_ranks or unapplied_ranks)
        if skipped and unapplied_ranks != self.world_size:
            # DeepSpeed reduces gradients before stepping, so a vetoed step is refused everywhere;
            # anything else means replicas now differ, and training on would hide it.
            raise RuntimeError(
                f"step {step}: DeepSpeed applied the update on {self.world_size - unapplied_ranks} of "
                f"{self.world_size} ranks although it was not finite; the model replicas differ. "
                "Resume from the last checkpoint; if this repeats, report it with the DeepSpeed config")
        if skipped:
            self.snapshot.restore()
        verdict = self.window.record(step, applied=not skipped)
        return StepOutcome(skipped, loss_ranks, buffer_ranks, self.world_size, verdict,
                           self.window.skips_in_window(step))

    @property
    def total_skipped(self) -> int:
        return self.window.total_skipped
