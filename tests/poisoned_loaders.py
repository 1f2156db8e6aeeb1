"""Train loaders that turn chosen batches into NaN or Inf images, for the non-finite guard tests.

`Poisoned` wraps any loader with the TrainLoader interface (the real ffcv one included) and is
handed to the Trainer through its `train_loader` argument. Its `observe` hook runs in the training
loop just before a batch reaches the model: at batch b the model holds the state after step b
(accumulation 1), which is how the tests look at the state right before and right after a skip."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


class Poisoned:
    def __init__(self, loader, bad: dict[tuple[int, int], float], persistent: bool = False,
                 observe: Callable[[int, int], None] | None = None, from_batch: tuple[int, int] | None = None):
        """`bad`: {(epoch, batch): fill value}; poisoned the first time each is read unless
        `persistent`. `from_batch`: (epoch, batch) from which every batch is NaN (always)."""
        self.loader, self.bad, self.persistent, self.observe = loader, dict(bad), persistent, observe
        self.from_batch = from_batch
        self.seen: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def fill_value(self, key: tuple[int, int]) -> float | None:
        if self.from_batch is not None and key >= self.from_batch:
            return math.nan
        if key in self.bad and (self.persistent or key not in self.seen):
            self.seen.add(key)
            return self.bad[key]
        return None

    def steps_per_epoch(self, layout=None) -> int:
        return self.loader.steps_per_epoch(layout)

    @property
    def dataset_size(self) -> int:
        return self.loader.dataset_size

    def epoch(self, epoch: int, start_step: int = 0, *, layout=None):
        batches = self.loader.epoch(epoch, start_step, layout=layout)
        accumulation_steps = layout.accumulation_steps if layout is not None else 1
        for batch, (images, targets) in enumerate(batches, start=start_step * accumulation_steps):
            if self.observe is not None:
                self.observe(epoch, batch)
            value = self.fill_value((epoch, batch))
            yield (images if value is None else torch.full_like(images, value)), targets


def model_state(trainer) -> dict[str, torch.Tensor]:
    """Copies of everything a step may change: parameters and buffers (by name), the base
    optimizer's state and parameters (DeepSpeed's fp32 master partitions), and the EMA."""
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    base = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for i, s in enumerate(base.state.values()):
        state.update({f"optim.{i}.{k}": v.detach().clone() for k, v in s.items() if torch.is_tensor(v)})
    for g, group in enumerate(base.param_groups):
        state.update({f"optim.param.{g}.{i}": p.detach().clone() for i, p in enumerate(group["params"])})
    if trainer.ema is not None:
        state.update({f"ema.{k}": v.clone() for k, v in trainer.ema.module.state_dict().items()})
    return state


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
