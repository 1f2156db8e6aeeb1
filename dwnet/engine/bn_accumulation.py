"""BatchNorm running statistics that do not depend on how a step's micro-batches are dealt out.

Each rank updates its running averages once per micro-batch it runs, and the ranks' averages are
averaged at every save and evaluation (`Trainer.sync_batchnorm_statistics`). With the plain momentum
m at every micro-batch, W ranks x A micro-steps would end a step at other averages than W' x A' for
the same global batch. At the a-th (1-based) of A micro-steps this uses momentum
k_a = (m / A) / (1 - (A - a) m / A) instead: one step then moves a rank's averages to
(1 - m) * before + (m / A) * (sum of its micro-batches' statistics), and the average over ranks
(linear) to (1 - m) * before + m * (mean over all of the step's micro-batches), whatever the layout;
with A = 1 it is plain momentum m. (`num_batches_tracked` still counts the rank's micro-batches; it
only matters to BatchNorms with momentum=None, cumulative averages, which are left as they are.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorms whose running averages follow a momentum."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is not None]


def micro_step_momentum(momentum: float, micro_step: int, accumulation_steps: int) -> float:
    share = momentum / accumulation_steps
    return share / (1.0 - (accumulation_steps - 1 - micro_step) * share)


@contextlib.contextmanager
def accumulation_momentum(norms: list[nn.modules.batchnorm._BatchNorm], micro_step: int,
                          accumulation_steps: int) -> Iterator[None]:
    """Runs the block (a forward of micro-step `micro_step`, 0-based) with each BatchNorm's momentum
    set for that micro-step, then puts the configured momenta back."""
    if accumulation_steps == 1:
        yield
        return
    configured = [norm.momentum for norm in norms]
    for norm, momentum in zip(norms, configured):
        norm.momentum = micro_step_momentum(momentum, micro_step, accumulation_steps)
    try:
        yield
    finally:
        for norm, momentum in zip(norms, configured):
            norm.momentum = momentum
