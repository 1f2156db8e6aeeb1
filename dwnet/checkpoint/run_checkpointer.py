"""The run's state in and out of checkpoints: save (and when), restore (in the same or another
precision, on the same or another rank layout) and the roll back to the last clean checkpoint when
non-finite steps persist.

`RunCheckpointer` is handed what it saves: the trainer's states (`TrainingStates`: engine, EMA,
progress, and how to build another engine) and the skip history of the step guard.
"""
from __future__ import annotations

import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dwnet.data.sharding import StepLayout
from dwnet.finite import nonfinite_on_any_rank, preview

from . import checkpointing, universal
from .export import consolidated_state_dict, read_client_state
from .layout import Log, TagMeta
from .progress import Progress
from .resume import ResumePlan, continue_precision, needs_reshard


class TrainingDiverged(RuntimeError):
    """Non-finite steps persisted after the fallback (or there is no clean checkpoint to return
    to): the run stops instead of burning compute. The message is one line saying what to change."""


class RollBack(Exception):  # noqa: N818 - an instruction to the loop, not an error
    """The run must go back to its last clean checkpoint; `why` says what was not finite."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class TrainingStates(Protocol):
    """What a checkpoint holds of the trainer, and how a restore gets an engine of its own."""

    engine: Any  # the DeepSpeed engine: module, optimizer, its own checkpoint files
    ema: Any  # timm ModelEmaV3 or None
    progress: Progress

    def build_engine(self, precision: str, state_dict: dict | None = None, load_universal: bool = False) -> None: ...

    def position_schedule(self) -> None: ...

    def sync_batchnorm_statistics(self) -> None: ...

    def identity(self) -> dict: ...


class SkipHistory(Protocol):
    """The step guard's skip window, as far as checkpoints record it."""

    def open_episode(self, step: int) -> list[int]: ...

    def first_skip(self) -> int | None: ...

    def carry_over(self, steps: list[int]) -> None: ...

    def reset(self) -> None: ...


class RunCheckpointer:
    """Saves `states` every `every_steps` optimizer steps (not at an epoch's last step: the epoch's
    own save follows) and at each epoch's end, restores them and rolls them back."""

    def __init__(self, root: str, rank: int, log: Log, keep_last: int, *, states: TrainingStates,
                 skips: SkipHistory, layout: StepLayout, zero_stage: int, seed: int, every_steps: int,
                 steps_per_epoch: int) -> None:
        self.root, self.rank, self.log, self.keep_last = root, rank, log, keep_last
        self.states, self.skips = states, skips
        self.layout, self.zero_stage, self.seed = layout, zero_stage, seed
        self.every_steps, self.steps_per_epoch = every_steps, steps_per_epoch
        self.loads_universal = False  # the current engine reads universal checkpoints

    # ---- saving ---------------------------------------------------------------------------
    def save_due(self, step: int) -> bool:
        """Is a periodic checkpoint due after optimizer step `step`? (The epoch's last step saves at
        the end of the epoch instead.)"""
        return bool(self.every_steps) and step % self.every_steps == 0 \
            and self.states.progress.step_in_epoch < self.steps_per_epoch

    def maybe_save(self, step: int) -> None:
        """After optimizer step `step`: saves when one is due; RollBack if the model is not finite."""
        if self.save_due(step):
            self.save()

    def save(self, is_best: bool = False, suffix: str = "") -> str:
        """Collective. Writes a checkpoint and returns its tag; RollBack (nothing written) when the
        model or EMA is not finite on some rank."""
        tag = self._write(is_best, suffix)
        if tag is None:
            raise RollBack(f"the model was not finite at step {self.states.progress.step} (checkpoint not written)")
        return tag

    def save_epoch(self, is_best: bool) -> str:
        """`save` at the end of an epoch."""
        tag = self._write(is_best)
        if tag is None:
            p = self.states.progress
            raise RollBack(f"the model was not finite at the end of epoch {p.epoch} (checkpoint not written)")
        return tag

    def _write(self, is_best: bool = False, suffix: str = "") -> str | None:
        if self.model_not_finite():
            return None
        s = self.states
        s.sync_batchnorm_statistics()
        p = s.progress
        p.recent_skips = self.skips.open_episode(p.step)
        meta = TagMeta(step=p.step, epoch=p.epoch, precision=p.precision, identity=s.identity(),
                       world_history=p.world_history, episode=p.recent_skips[0] if p.recent_skips else None)
        # Buffers travel in the client state too: DeepSpeed's universal format does not carry them.
        client_state = {"progress": p.state(), "buffers": dict(s.engine.module.named_buffers()),
                        "ema": s.ema.module.state_dict() if s.ema is not None else None}
        tag = checkpointing.save(s.engine, self.root, p.step, client_state, self.keep_last,
                                 is_best=is_best, suffix=suffix, meta=meta)
        self.log.info("saved checkpoint %s%s", tag, "" if meta.episode is None else
                      f" (non-finite episode open since step {meta.episode}: not a rollback target)")
        return tag

    def model_not_finite(self) -> bool:
        """Collective: does any rank hold a NaN/Inf parameter or buffer, in the model or the EMA?
        Each rank with one logs which."""
        s = self.states
        modules = [("", s.engine.module)] + ([("ema.", s.ema.module)] if s.ema is not None else [])
        bad, names = nonfinite_on_any_rank(modules)
        if names:
            self.log.warning("step %d: %s not finite on this rank", s.progress.step, preview(names), all_ranks=True)
        return bad

    # ---- restoring ------------------------------------------------------------------------
    def resume(self, plan: ResumePlan) -> None:
        """Builds the engine holding `plan.tag`, in the precision the run continues in."""
        if plan.precision != plan.saved_precision:
            self._restore_in_precision(plan.tag, plan.precision)
        else:
            self._build_engine(plan.precision, load_universal=plan.reshard)
            self.restore(plan.tag)
        self.skips.carry_over(self.states.progress.recent_skips)

    def restore(self, tag: str) -> None:
        """Engine, optimizer, RNG, progress, buffers, EMA and LR schedule as saved in `tag`; a tag
        of another world size or ZeRO stage goes through its universal copy."""
        reshard = needs_reshard(self.root, tag, self.layout.world_size, self.zero_stage)
        if reshard:  # collective on every rank, whatever each sees on disk: rank 0 decides
            self._convert(tag)
        if reshard != self.loads_universal:  # a rollback target of another layout than the resumed tag
            self._build_engine(self.states.progress.precision, load_universal=reshard)
        client = checkpointing.load(self.states.engine, self.root, tag, seed=self.seed, reshard=reshard)
        self._restore_client_state(tag, client)

    def _convert(self, tag: str) -> None:
        fresh = self.rank == 0 and not universal.is_converted(self.root, tag)
        if fresh:
            self.log.info("converting %s to DeepSpeed's universal format for this rank layout (once per tag, "
                          "into %s)", tag, universal.universal_root(self.root))
        started = time.perf_counter()
        universal.convert_on_rank0(self.root, tag)
        if fresh:
            self.log.info("converted %s in %.0f s", tag, time.perf_counter() - started)

    def _build_engine(self, precision: str, state_dict: dict | None = None, load_universal: bool = False) -> None:
        self.states.build_engine(precision, state_dict=state_dict, load_universal=load_universal)
        self.loads_universal = load_universal

    def _restore_in_precision(self, tag: str, precision: str) -> None:
        """`tag` into a fresh engine of another precision: the fp32 master weights seed it, the
        optimizer moments restart (DeepSpeed cannot load them across precisions)."""
        self._build_engine(precision, state_dict=consolidated_state_dict(self.root, tag))
        self._restore_client_state(tag, read_client_state(self.root, tag))
        checkpointing.load_rng_state(self.root, tag, self.seed)

    def _restore_client_state(self, tag: str, client: dict) -> None:
        """Progress, module buffers (BatchNorm statistics: the universal format skips them) and EMA
        from the tag's client state. A position saved under another global batch is carried over
        in samples (rounded down to a step)."""
        s = self.states
        saved = TagMeta.read(self.root, tag).identity
        s.progress.load_state(client["progress"], saved.get("accumulation_steps", 1))
        global_batch = self.layout.global_batch
        saved_global = saved.get("global_batch", global_batch)
        if saved_global != global_batch:
            s.progress.step_in_epoch = s.progress.step_in_epoch * saved_global // global_batch
        buffers = client.get("buffers") or {}
        with torch.no_grad():
            for name, buffer in s.engine.module.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        if s.ema is not None and client.get("ema") is not None:
            s.ema.module.load_state_dict(client["ema"])
        elif client.get("ema") is not None:
            self.log.warning("%s holds an EMA of the weights, which this run does not continue (engine.ema=false)", tag)
        s.position_schedule()

    # ---- rolling back ---------------------------------------------------------------------
    def roll_back(self, why: str) -> None:
        """Collective. Reloads the newest checkpoint saved before the current non-finite episode
        (bf16 continues in fp32), or stops the run with TrainingDiverged when that was tried already
        or there is none. Tags newer than the target are removed: they hold abandoned steps."""
        p, root = self.states.progress, self.root
        first_skip = self.skips.first_skip()
        since = f"the first skipped step {first_skip}" if first_skip is not None else f"step {p.step}"
        if dist.is_initialized():
            dist.barrier()  # every rank has read the tags' metadata before any is removed
        target = checkpointing.rollback_target(root)
        removed = checkpointing.discard_after(root, target) if target is not None else []
        if p.fallbacks >= 1 or target is None:
            message = (why + (" again after the fallback" if p.fallbacks else "; no clean checkpoint to roll back to")
                       + f"; lower optim.base_lr or raise optim.warmup_epochs, then resume from {root}"
                       + (f" (it restarts from {target}, the newest checkpoint before {since})" if target else ""))
            self._stop(message)
        old_precision = p.precision
        new_precision = continue_precision(old_precision, fallback=True)
        self.log.warning("rolling back to %s, the newest checkpoint saved before %s: %s; continuing in %s%s",
                         target, since, why, new_precision,
                         f"; removed the newer {', '.join(removed)}" if removed else "")
        if new_precision != old_precision:
            self._restore_in_precision(target, new_precision)
        else:
            self.restore(target)
        self.skips.reset()
        p.fallbacks += 1
        p.history.append({"step": p.step, "from": old_precision, "to": new_precision})
        # The target may predate this run's rank layout.
        p.record_layout(self.layout.world_size, self.layout.accumulation_steps, self.zero_stage)
        # Record the switch (under a new tag: the good checkpoint is never overwritten) so that a
        # crash from here on resumes in the new precision.
        if self._write(suffix=f"fallback{p.fallbacks}") is None:
            self._stop(f"{target} is not finite after reloading it; resume from an earlier tag of {root}")

    def _stop(self, message: str) -> None:
        self.log.to_file("stopping: %s", message)
        raise TrainingDiverged(message)
