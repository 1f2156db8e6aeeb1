"""Makes a non-finite optimizer step change nothing, on every rank.

What a step can change, and how each is protected when the step is skipped:
- parameters and optimizer state: the update is vetoed by the optimizer's own check.
  A rank that saw a non-finite loss or BatchNorm statistic multiplies its last micro-batch's loss
  by NaN, so its gradients are non-finite; gradients are reduced over ranks before any optimizer
  step, so every rank's check refuses the same update: the fused step's device flag at ZeRO 0-2
  (`FusedAdamW`, `FlatZeroStep`), DeepSpeed's overflow check at ZeRO-3. This also catches a *finite* loss whose activations
  overflowed a BN statistic.
- BatchNorm running statistics and `num_batches_tracked` (and any other buffer): written by the
  forward pass itself, before anything can be checked. They are copied at the start of the step
  (before its first micro-batch) and, when the step is skipped, put back on every rank.
- EMA: its update is weighted by "kept" (0 or 1) on the device.
The decision is one all-reduced flag vector, so ranks cannot disagree about a skip. It stays on the
device: nothing in a step waits for the host to read it. `StepOutcome` reads it when asked, and
the trainer asks for all the steps since the last one at once, at its logging and saving steps.

Skipping is for bad luck; `SkipWindow` decides when it is not enough: `max_skips` skips within
`window` steps mean the run is unstable, and `settle()` gives the verdict that asks for a rollback.
"""
from __future__ import annotations

from collections import deque
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


class StepOutcome:
    """One optimizer step's verdict, all-reduced over ranks. The flags stay on the device until a
    field is read (a host sync); `settle_all` reads many outcomes with one."""

    def __init__(self, step: int, flags: torch.Tensor, world_size: int) -> None:
        self.step = step
        self.flags = flags  # float [non-finite-loss ranks, non-finite-buffer ranks, unapplied ranks]
        self.world_size = world_size
        self.skipped_on_device = flags.sum() > 0  # 0-dim bool, for what must follow the verdict unread
        self._counts: list[int] | None = None
        self.verdict = Verdict.OK  # set by StepGuard.settle, with the window's count after this step
        self.skips_in_window = 0

    @staticmethod
    def settle_all(outcomes: list[StepOutcome]) -> None:
        """Reads every outcome's flags back in one transfer."""
        unread = [o for o in outcomes if o._counts is None]
        if unread:
            for outcome, counts in zip(unread, torch.stack([o.flags for o in unread]).tolist(), strict=True):
                outcome._settle(counts)

    def _settle(self, counts: list[float]) -> None:
        loss_ranks, buffer_ranks, unapplied_ranks = (int(v) for v in counts)
        self._counts = [loss_ranks, buffer_ranks, unapplied_ranks]
        if (loss_ranks or buffer_ranks or unapplied_ranks) and unapplied_ranks != self.world_size:
            # Gradients are reduced before stepping, so a vetoed step is refused everywhere;
            # anything else means replicas now differ, and training on would hide it.
            raise RuntimeError(
                f"step {self.step}: the update was applied on {self.world_size - unapplied_ranks} of "
                f"{self.world_size} ranks although it was not finite; the model replicas differ. "
                "Resume from the last checkpoint; if this repeats, report it with the DeepSpeed config")

    def _read(self) -> list[int]:
        if self._counts is None:
            self._settle(self.flags.tolist())
        return self._counts

    @property
    def loss_ranks(self) -> int:
        """Ranks whose loss (any micro-batch) was not finite."""
        return self._read()[0]

    @property
    def buffer_ranks(self) -> int:
        """Ranks whose BatchNorm statistics were not finite."""
        return self._read()[1]

    @property
    def skipped(self) -> bool:
        return any(self._read())

    def reason(self) -> str:
        parts = []
        if self.loss_ranks:
            parts.append(f"non-finite loss on {self.loss_ranks} of {self.world_size} ranks")
        if self.buffer_ranks:
            parts.append(f"non-finite BatchNorm statistics on {self.buffer_ranks} of {self.world_size} ranks")
        return ", ".join(parts) or "non-finite gradient (norm)"


class BufferSnapshot:
    """A copy of every buffer of a module, taken before a step and put back on the device if the
    step is skipped. The module's buffers are rebound to views of one flat tensor per dtype and
    device, so that taking the copy and putting it back are one operation each per group."""

    def __init__(self) -> None:
        self._views: list[torch.Tensor] = []  # the module's buffers, as views of `_live`
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def capture(self, module: nn.Module) -> None:
        # Checked each time: a rebuilt engine (precision fallback) or a cast brings new buffer tensors.
        buffers = list(module.buffers())
        if len(buffers) != len(self._views) or any(b is not v for b, v in zip(buffers, self._views)):
            self._flatten(module)
        if self._live:
            torch._foreach_copy_(self._saved, self._live)

    def _flatten(self, module: nn.Module) -> None:
        owners = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, b) in enumerate(owners):
            groups.setdefault((b.dtype, b.device), []).append(i)
        self._live, views = [], {}
        for (dtype, device), members in groups.items():
            flat = torch.cat([owners[i][2].detach().reshape(-1) for i in members]).to(device=device, dtype=dtype)
            pieces = flat.split([owners[i][2].numel() for i in members])
            for i, piece in zip(members, pieces, strict=True):
                views[i] = piece.view(owners[i][2].shape)
            self._live.append(flat)
        for i, (owner, name, _) in enumerate(owners):
            owner._buffers[name] = views[i]
        self._views = list(module.buffers())
        self._saved = [flat.clone() for flat in self._live]

    def restore_where(self, skipped: torch.Tensor) -> None:
        """Puts the captured values back where `skipped` (a 0-dim device tensor) is true."""
        for live, saved in zip(self._live, self._saved, strict=True):
            live.copy_(torch.where(skipped.to(device=live.device, dtype=torch.bool), saved, live))

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

    def end(self, not_applied: torch.Tensor | bool, step: int) -> StepOutcome:
        """Collective. Decides the step on all ranks at once and puts the buffers back if it was
        skipped, on the device. `not_applied`: the optimizer's own verdict (a device flag, or
        DeepSpeed's host bool)."""
        if self._losses_finite is None or self._buffers_finite is None:
            raise RuntimeError("StepGuard.end() without loss_for_backward(last_micro_batch=True) this step")
        device = self._losses_finite.device
        not_applied = torch.as_tensor(not_applied, device=device).reshape(())
        flags = torch.stack([~self._losses_finite, ~self._buffers_finite, not_applied.bool()]).to(torch.float32)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flags)
        outcome = StepOutcome(step, flags, self.world_size)
        self.snapshot.restore_where(outcome.skipped_on_device)
        return outcome

    def settle(self, outcomes: list[StepOutcome]) -> list[StepOutcome]:
        """Reads the outcomes' flags in one transfer and records them, in step order, in the skip
        window; each outcome then carries its `verdict` and `skips_in_window`."""
        StepOutcome.settle_all(outcomes)
        for outcome in outcomes:
            outcome.verdict = self.window.record(outcome.step, applied=not outcome.skipped)
            outcome.skips_in_window = self.window.skips_in_window(outcome.step)
        return outcomes

    @property
    def total_skipped(self) -> int:
        """Skipped steps among those settled so far."""
        return self.window.total_skipped
