"""Bookkeeping for non-finite training steps: skip, and decide when skipping is no longer enough."""
from __future__ import annotations

from collections import deque
from enum import Enum


class Verdict(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    ROLLBACK = "rollback"  # too many skips in the window: reload the last good checkpoint


class NonFiniteGuard:
    """Counts skipped optimizer steps in a sliding window of `window` steps.

    A step is skipped (by DeepSpeed's overflow check or GuardedAdamW) when the loss or any gradient
    is not finite; `max_skips` skips within the window mean the run is unstable, not unlucky.
    """

    def __init__(self, max_skips: int, window: int):
        self.max_skips = max_skips
        self.window = window
        self.skipped_steps: deque[int] = deque()
        self.total_skipped = 0

    def record(self, step: int, applied: bool) -> Verdict:
        while self.skipped_steps and self.skipped_steps[0] <= step - self.window:
            self.skipped_steps.popleft()
        if applied:
            return Verdict.OK
        self.skipped_steps.append(step)
        self.total_skipped += 1
        if len(self.skipped_steps) >= self.max_skips:
            self.skipped_steps.clear()
            return Verdict.ROLLBACK
        return Verdict.SKIPPED
