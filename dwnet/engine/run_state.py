"""The run's state in and out of checkpoints, for the Trainer: save, restore (in the same or
another precision, on the same or another rank layout) and the roll back to the last clean
checkpoint when non-finite steps persist.

A mixin of `Trainer`: it uses the trainer's engine, optimizer, scheduler, EMA, progress, guard,
layout and log, and its `_build_engine` when a restore needs a different engine.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from . import checkpointing, resume, universal
from .export import consolidated_state_dict, read_client_state
from .finite import nonfinite_on_any_rank, preview
from .progress import Progress


class TrainingDiverged(RuntimeError):
    """Non-finite steps persisted after the fallback (or there is no clean checkpoint to return
    to): the run stops instead of burning compute. The message is one line saying what to change."""


class RunState:
    def _restore(self, tag: str) -> None:
        """Engine, optimizer, RNG, progress, buffers, EMA and LR schedule as saved in `tag`; a tag
        of another world size or ZeRO stage goes through its universal copy."""
        reshard = resume.needs_reshard(self.checkpoints, tag, self.world_size, self.cfg.engine.zero_stage)
        if reshard:  # collective on every rank, whatever each sees on disk: rank 0 decides
            fresh = self.rank == 0 and not universal.is_converted(self.checkpoints, tag)
            if fresh:
                self.log.info("converting %s to DeepSpeed's universal format for this rank layout (once per tag, "
                              "into %s)", tag, universal.universal_root(self.checkpoints))
            started = time.perf_counter()
            universal.convert_on_rank0(self.checkpoints, tag)
            if fresh:
                self.log.info("converted %s in %.0f s", tag, time.perf_counter() - started)
        if reshard != self.loads_universal:  # a rollback target of another layout than the resumed tag
            self._build_engine(self.progress.precision, load_universal=reshard)
        client = checkpointing.load(self.engine, self.checkpoints, tag, seed=self.cfg.engine.seed, reshard=reshard)
        self._restore_client_state(tag, client)

    def _restore_in_precision(self, tag: str, precision: str) -> None:
        """`tag` into a fresh engine of another precision: the fp32 master weights seed it, the
        optimizer moments restart (DeepSpeed cannot load them across precisions)."""
        self._build_engine(precision, state_dict=consolidated_state_dict(self.checkpoints, tag))
        self._restore_client_state(tag, read_client_state(self.checkpoints, tag))
        self.progress.precision = precision
        checkpointing.load_rng_state(self.checkpoints, tag, self.cfg.engine.seed)

    def _restore_client_state(self, tag: str, client: dict) -> None:
        """Progress, module buffers (BatchNorm statistics: the universal format skips them) and EMA
        from the tag's client state. A position saved under another global batch is carried over
        in samples (rounded down to a step)."""
        saved = checkpointing.read_meta(self.checkpoints, tag).get(checkpointing.IDENTITY) or {}
        precision = self.progress.precision
        self.progress = Progress.from_state(client["progress"], saved.get("accumulation_steps", 1))
        self.progress.precision = precision
        saved_global = saved.get("global_batch", self.layout.global_batch)
        if saved_global != self.layout.global_batch:
            self.progress.step_in_epoch = self.progress.step_in_epoch * saved_global // self.layout.global_batch
        buffers = client.get("buffers") or {}
        with torch.no_grad():
            for name, buffer in self.engine.module.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.module.load_state_dict(client["ema"])
        elif client.get("ema") is not None:
            self.log.warning("%s holds an EMA of the weights, which this run does not continue (engine.ema=false)", tag)
        self._position_schedule()

    def _model_not_finite(self) -> bool:
        """Collective: does any rank hold a NaN/Inf parameter or buffer, in the model or the EMA?
        Each rank with one logs which."""
        modules = [("", self.engine.module)] + ([("ema.", self.ema.module)] if self.ema is not None else [])
        bad, names = nonfinite_on_any_rank(modules)
        if names:
            self.log.warning("step %d: %s not finite on this rank", self.progress.step, preview(names), all_ranks=True)
        return bad

    def save(self, is_best: bool = False, suffix: str = "") -> str | None:
        """Collective. Writes a checkpoint and returns its tag, or writes nothing and returns None
        when the model or EMA is not finite on some rank (the caller rolls back)."""
        if self._model_not_finite():
            return None
        self.sync_batchnorm_statistics()
        p = self.progress
        meta = {"step": p.step, "epoch": p.epoch, "precision": p.precision,
                checkpointing.IDENTITY: self.identity(), "world_history": p.world_history}
        p.recent_skips = [] if not self.guard.skips_in_window(p.step) else list(self.guard.skipped_steps)
        if p.recent_skips:
            meta[checkpointing.EPISODE] = p.recent_skips[0]
        # Buffers travel in the client state too: DeepSpeed's universal format does not carry them.
        client_state = {"progress": p.state(), "buffers": dict(self.engine.module.named_buffers()),
                        "ema": self.ema.module.state_dict() if self.ema is not None else None}
        tag = checkpointing.save(self.engine, self.checkpoints, p.step, client_state, self.cfg.checkpoint.keep_last,
                                 is_best=is_best, suffix=suffix, meta=meta)
        episode = meta.get(checkpointing.EPISODE)
        self.log.info("saved checkpoint %s%s", tag, "" if episode is None else
                      f" (non-finite episode open since step {episode}: not a rollback target)")
        return tag

    def _roll_back(self, why: str) -> None:
        """Collective. Reloads the newest checkpoint saved before the current non-finite episode
        (bf16 continues in fp32), or stops the run with TrainingDiverged when that was tried already
        or there is none. Tags newer than the target are removed: they hold abandoned steps."""
        p, root = self.progress, self.checkpoints
        first_skip = self.guard.first_skip()
        since = f"the first skipped step {first_skip}" if first_skip is not None else f"step {p.step}"
        if dist.is_initialized():
            dist.barrier()  # every rank has read the tags' metadata before any is removed
        target = checkpointing.rollback_target(root)
        removed = checkpointing.discard_after(root, target) if target is not None else []
        if p.fallbacks >= 1 or target is None:
            message = (why + (" again after the fallback" if p.fallbacks else "; no clean checkpoint to roll back to")
                       + f"; lower optim.base_lr or raise optim.warmup_epochs, then resume from {root}"
                       + (f" (it restarts from {target}, the newest checkpoint before {since})" if target else ""))
            self.log.to_file("stopping: %s", message)
            raise TrainingDiverged(message)
        old_precision = p.precision
        new_precision = "fp32" if old_precision == "bf16" else old_precision
        self.log.warning("rolling back to %s, the newest checkpoint saved before %s: %s; continuing in %s%s",
                         target, since, why, new_precision,
                         f"; removed the newer {', '.join(removed)}" if removed else "")
        if new_precision != old_precision:
            self._restore_in_precision(target, new_precision)
        else:
            self._restore(target)
        self.guard.reset()
        self.progress.fallbacks += 1
        self.progress.history.append({"step": self.progress.step, "from": old_precision, "to": new_precision})
        # The target may predate this run's rank layout.
        self.progress.record_layout(self.world_size, self.cfg.optim.accumulation_steps, self.cfg.engine.zero_stage)
        # Record the switch (under a new tag: the good checkpoint is never overwritten) so that a
        # crash from here on resumes in the new precision.
        if self.save(suffix=f"fallback{self.progress.fallbacks}") is None:
            message = f"{target} is not finite after reloading it; resume from an earlier tag of {root}"
            self.log.to_file("stopping: %s", message)
            raise TrainingDiverged(message)
