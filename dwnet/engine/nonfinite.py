"""Bookkeeping for non-finite training steps: count skips, and decide when skipping is no longer enough."""
from __future__ import annotations

from collections import deque
from enum import Enum


class Verdict(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    ROLLBACK = "rollback"  # too many skips in the window: reload the last clean checkpoint


class NonFiniteGuard:
    """Counts skipped optimizer steps in a sliding window of `window` steps.

    `max_skips` skips within the window mean the run is unstable, not unlucky. While the window
    holds any skip a non-finite *episode* is open: checkpoints written then are not rollback
    targets, since the weights may already be drifting towards the divergence.
    """

    def __init__(self, max_skips: int, window: int):
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

    def first_skip(self) -> int | None:
        """The step that opened the current episode, if one is open."""
        return self.skipped_steps[0] if self.skipped_steps else None

    def reset(self) -> None:
        self.skipped_steps.clear()
