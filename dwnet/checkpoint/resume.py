"""Resuming a run: which tag, whether it fits this run's config, and how this run's ranks load it.

A run may come back on another number of ranks (a node lost, another allocation) or another ZeRO
stage. The global batch (and with it the data order, the step count per epoch and the LR schedule)
is kept by recomputing `optim.accumulation_steps`; the optimizer state is resharded through
DeepSpeed's universal checkpoint (`universal.py`). What cannot be kept stops the run before any
work, in one line that says what would work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

from dwnet.config import RunConfig
from dwnet.data.sharding import StepLayout
from dwnet.errors import UserError

from . import checkpointing, universal
from .layout import Log, TagMeta


class ResumeMismatchError(UserError):
    """The checkpoint to resume belongs to another model, or its batch or ZeRO setting cannot be
    carried over to this run; one line naming both values and what would work."""


def identity(cfg: RunConfig, world_size: int, train_samples: int) -> dict:
    """What a checkpoint of this run records about it (in COMPLETE) for a resume to compare."""
    return {"model": cfg.model.name, "num_classes": cfg.model.num_classes,
            "global_batch": StepLayout.of(cfg, world_size).global_batch, "batch_size": cfg.data.batch_size,
            "world_size": world_size, "accumulation_steps": cfg.optim.accumulation_steps,
            "train_samples": train_samples, "zero_stage": cfg.engine.zero_stage, "epochs": cfg.optim.epochs}


def continue_precision(saved: str, *, wanted: str | None = None, switch_precision: bool = False,
                       fallback: bool = False) -> str:
    """The precision a run continues in from a tag saved in `saved`. After a non-finite fallback
    (`fallback`) bf16 drops to fp32. On a resume, `wanted` (engine.precision) applies when it is
    fp32 (always allowed) or with `switch_precision`; away from fp32, which may be a fallback's
    decision, the saved precision stays otherwise."""
    if fallback:
        return "fp32" if saved == "bf16" else saved
    if wanted is None or wanted == saved:
        return saved
    return wanted if wanted == "fp32" or switch_precision else saved


@dataclass
class ResumePlan:
    tag: str
    saved: dict  # the tag's identity ({} for tags from before identities were recorded)
    accumulation_steps: int  # what this run uses
    reshard: bool  # load through the universal checkpoint (another world size or ZeRO stage)
    saved_precision: str
    wanted_precision: str  # engine.precision
    precision: str  # what this run continues in (`continue_precision`)
    announcements: list[str] = field(default_factory=list)

    def announce(self, log: Log, mine: dict) -> None:
        """What changes with this resume, in one line each; `mine` is this run's identity."""
        for line in self.announcements:
            log.info("resuming %s: %s", self.tag, line)
        saved, tag = self.saved, self.tag
        if saved and saved.get("train_samples", mine["train_samples"]) != mine["train_samples"]:
            log.warning("resuming %s with %d training samples (saved with %d): the training data changed",
                        tag, mine["train_samples"], saved["train_samples"])
        if saved and mine["epochs"] > saved.get("epochs", mine["epochs"]):
            log.info("optim.epochs raised from %d to %d: the LR schedule continues on the longer cosine",
                     saved["epochs"], mine["epochs"])
        if self.precision != self.saved_precision:
            log.info("resuming %s (saved in %s) in %s as engine.precision asks; optimizer moments restart",
                     tag, self.saved_precision, self.precision)
        elif self.precision != self.wanted_precision:
            log.info("resuming %s in %s as saved (engine.precision=%s is not applied: pass --switch-precision "
                     "to continue in %s)", tag, self.saved_precision, self.wanted_precision, self.wanted_precision)


def plan_resume(cfg: RunConfig, root: str, tag: str, world_size: int, new_global_batch: bool = False,
                switch_precision: bool = False) -> ResumePlan:
    """How this run (cfg on `world_size` ranks) resumes `tag`, or ResumeMismatchError."""
    where = os.path.join(root, tag)
    meta = TagMeta.read(root, tag)
    saved = meta.identity
    accumulation = cfg.optim.accumulation_steps
    wanted = cfg.engine.precision
    saved_precision = meta.precision or wanted
    precision = continue_precision(saved_precision, wanted=wanted, switch_precision=switch_precision)

    def plan(accumulation_steps: int, reshard: bool, notes: list[str]) -> ResumePlan:
        return ResumePlan(tag, saved, accumulation_steps, reshard, saved_precision, wanted, precision, notes)

    if not saved:
        return plan(accumulation, False, [])
    mine = {"model": cfg.model.name, "num_classes": cfg.model.num_classes}
    for key, field_name in (("model", "model.name"), ("num_classes", "model.num_classes")):
        if key in saved and saved[key] != mine[key]:
            raise ResumeMismatchError(
                f"{where} holds {field_name}={saved[key]}, this run has {field_name}={mine[key]}; set "
                f"{field_name}={saved[key]} to resume it, or use a new checkpoint.dir for the new model")
    notes: list[str] = []
    old_stage, stage = saved.get("zero_stage", cfg.engine.zero_stage), cfg.engine.zero_stage
    if old_stage != stage:
        if 0 in (old_stage, stage):
            raise ResumeMismatchError(
                f"{where} was saved with engine.zero_stage={old_stage}, this run has engine.zero_stage={stage}: "
                "ZeRO-0 keeps no optimizer shards for DeepSpeed's universal converter, so a stage change to or from "
                f"0 cannot carry the optimizer state; set engine.zero_stage={old_stage} to resume")
        notes.append(f"engine.zero_stage {old_stage} -> {stage}: optimizer state resharded")
    old_world = saved.get("world_size", world_size)
    global_batch = StepLayout.of(cfg, world_size).global_batch
    old_global = saved.get("global_batch", global_batch)
    per_step = StepLayout(cfg.data.batch_size, world_size, 1).global_batch  # one micro-step over all ranks
    if new_global_batch:
        if old_global != global_batch:
            notes.append(f"global batch {old_global} -> {global_batch} (--new-global-batch): "
                         "learning rate rescaled, steps per epoch recomputed")
    elif old_global % per_step:
        raise ResumeMismatchError(_cannot_keep(where, saved, cfg, world_size, old_global))
    else:
        accumulation = old_global // per_step
        changes = [f"{name} {before} -> {now}" for name, before, now in (
            ("world size", old_world, world_size), ("data.batch_size", saved.get("batch_size"), cfg.data.batch_size))
            if before is not None and before != now]
        if changes:
            notes.append(f"{', '.join(changes)}: accumulation {saved.get('accumulation_steps')} -> {accumulation}, "
                         f"global batch {old_global} kept")
    return plan(accumulation, needs_reshard(root, tag, world_size, stage), notes)


def needs_reshard(root: str, tag: str, world_size: int, zero_stage: int) -> bool:
    """Must `tag` be loaded through its universal copy by a run of `world_size` ranks at `zero_stage`?"""
    saved = TagMeta.read(root, tag).identity
    changed = saved.get("world_size", world_size) != world_size or saved.get("zero_stage", zero_stage) != zero_stage
    return changed and universal.has_partitioned_optimizer(os.path.join(root, tag))


def _cannot_keep(where: str, saved: dict, cfg: RunConfig, world_size: int, old_global: int) -> str:
    batch = cfg.data.batch_size
    if old_global % batch == 0:
        slots = old_global // batch
        why = f"its {slots} micro-batches of {batch} per step cannot be dealt evenly to {world_size} ranks"
        options = f"relaunch on {', '.join(str(w) for w in range(1, slots + 1) if slots % w == 0)} ranks"
    else:
        why = f"{old_global} is not a multiple of data.batch_size={batch}"
        per_rank = old_global // world_size if old_global % world_size == 0 else 0
        sizes = [b for b in range(min(per_rank, max(batch, saved.get("batch_size", batch))), 0, -1)
                 if per_rank % b == 0][:4]
        options = f"set data.batch_size to {' or '.join(map(str, sizes))}" if sizes else \
            f"relaunch on {saved.get('world_size')} ranks"
    return (f"{where} was saved with global batch {old_global} (data.batch_size={saved.get('batch_size')} x "
            f"{saved.get('world_size')} ranks x optim.accumulation_steps={saved.get('accumulation_steps')}); this "
            f"run cannot keep it ({why}): {options}, or pass --new-global-batch to continue with global batch "
            f"{StepLayout.of(cfg, world_size).global_batch} (learning rate rescaled)")


def find_resume_tag(root: str, rank: int, world_size: int, log: Log) -> str | None:
    """Collective. The newest complete tag whose files all read back; damaged newer ones are
    moved aside (`step_N.damaged`) with one line each, so a bad disk block never blocks a run."""
    if rank == 0 and os.path.isdir(root):
        removed = checkpointing.remove_incomplete(root)
        if removed:
            log.info("removed incomplete checkpoint tags (saves cut short): %s", ", ".join(removed))
        for name in checkpointing.repair_pointers(root):
            log.warning("%s: damaged or stale pointer file, rebuilt from the tags", os.path.join(root, name))
    while True:
        tag = _agreed(root, checkpointing.newest_complete_tag(root), world_size)
        if tag is None:
            return None
        problem = _first_problem(root, tag, rank, world_size)
        if problem is None:
            return tag
        if rank == 0:
            moved = checkpointing.move_aside(root, tag)
            log.warning("checkpoint %s is damaged (%s): moved aside to %s, resuming from the previous "
                        "complete tag", tag, problem, moved)
        if dist.is_initialized():
            dist.barrier()  # every rank sees the rename before looking for the next tag


def _agreed(root: str, tag: str | None, world_size: int) -> str | None:
    # Every rank must agree (a node with a stale shared-filesystem view would otherwise diverge).
    if dist.is_initialized():
        tags = [None] * world_size
        dist.all_gather_object(tags, tag)
        if len(set(tags)) != 1:
            raise RuntimeError(f"ranks see different newest checkpoints in {root}: {tags}; "
                               "the checkpoint directory must be one shared path")
    return tag


def _first_problem(root: str, tag: str, rank: int, world_size: int) -> str | None:
    """Collective: the ranks split the tag's files, check them, and all get the first problem
    found, so that all take the same decision (and none enters a load the others skip)."""
    problem = checkpointing.verify_tag(root, tag, rank, world_size)
    if not dist.is_initialized():
        return problem
    problems = [None] * world_size
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)
