"""Where a run is: saved in every checkpoint, restored on resume, the one source of the current
precision (written only where the engine is built) and of the rank layouts the run has trained on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of `epoch` done: the next one starts there
    step: int = 0  # optimizer steps taken (skipped ones included); names the checkpoint tags
    best_top1: float = -1.0
    precision: str = "fp32"
    fallbacks: int = 0
    history: list = field(default_factory=list)  # precision switches, for the record
    recent_skips: list = field(default_factory=list)  # skipped steps in the guard's window at save time
    # One entry per rank layout trained on: {"step", "world_size", "accumulation_steps", "zero_stage"}.
    world_history: list = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state(self, state: dict[str, Any], accumulation_steps: int = 1) -> None:
        """Takes the position from `state()` in place, all but the precision, which belongs to the
        engine that was built to continue (it is set where that engine is built). Tags written before
        positions were counted in steps held the micro-batch index (`batch_in_epoch`), which
        `accumulation_steps` (the saved run's) converts."""
        state = dict(state)
        if "batch_in_epoch" in state:
            state["step_in_epoch"] = state.pop("batch_in_epoch") // max(accumulation_steps, 1)
        fresh = Progress()
        for f in dataclasses.fields(self):
            if f.name != "precision":
                setattr(self, f.name, state.get(f.name, getattr(fresh, f.name)))

    def schedule_position(self, steps_per_epoch: int) -> int:
        """The LR schedule's step: equal to `step` unless the global batch was changed on a resume."""
        return self.epoch * steps_per_epoch + self.step_in_epoch

    def record_layout(self, world_size: int, accumulation_steps: int, zero_stage: int) -> None:
        """Appends the layout to `world_history` unless it is the last one recorded."""
        layout = {"world_size": world_size, "accumulation_steps": accumulation_steps, "zero_stage": zero_stage}
        last = self.world_history[-1] if self.world_history else {}
        if any(last.get(k) != v for k, v in layout.items()):
            self.world_history.append({"step": self.step, **layout})
