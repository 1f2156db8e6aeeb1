"""Crash-safe DeepSpeed checkpoints: a tag counts only once every rank finished writing it.

Layout under the run directory:
    checkpoints/step_00001200/...   DeepSpeed files of that tag, plus
        COMPLETE                    written by rank 0 after a barrier: the tag is whole
        rng_rank{r}.pt              each rank's RNG states (exact resume)
    checkpoints/latest              name of the newest complete tag (atomic replace)
    checkpoints/best                name of the tag with the best validation top-1
A SIGKILL mid-save leaves a tag without COMPLETE, which resume ignores and pruning removes.

COMPLETE holds the tag's metadata. A tag saved while a non-finite episode was open (skipped steps
in the guard's window) carries `nonfinite_episode` (the episode's first skipped step): it is never a
rollback target, and pruning always spares the newest tag without it, the rollback target.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dwnet.atomic_io import atomic_open, fsync_tree

COMPLETE = "COMPLETE"
EPISODE = "nonfinite_episode"  # COMPLETE key: first skipped step of the episode open at save time


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for_step(step: int, suffix: str = "") -> str:
    """Tags sort by step; a suffixed tag of the same step sorts after (is newer than) the plain one."""
    return f"step_{step:08d}" + (f".{suffix}" if suffix else "")


def _atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def complete_tags(root: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if t.startswith("step_") and os.path.isfile(os.path.join(root, t, COMPLETE))]
    return sorted(tags)


def read_pointer(root: str, name: str) -> str | None:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isfile(os.path.join(root, tag, COMPLETE)) else None


def read_meta(root: str, tag: str) -> dict[str, Any]:
    with open(os.path.join(root, tag, COMPLETE)) as fh:
        return json.load(fh)


def newest_complete_tag(root: str) -> str | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


def is_clean(root: str, tag: str) -> bool:
    """Saved with no non-finite episode open (tags from before this key existed count as clean)."""
    return read_meta(root, tag).get(EPISODE) is None


def rollback_target(root: str) -> str | None:
    """The newest complete tag saved outside any non-finite episode. Every tag saved after the
    current episode's first skip is marked, so this tag predates that skip."""
    clean = [t for t in complete_tags(root) if is_clean(root, t)]
    return clean[-1] if clean else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, step: int, client_state: dict[str, Any], keep_last: int,
         is_best: bool = False, meta: dict[str, Any] | None = None, suffix: str = "") -> str:
    """Collective: every rank must call it. `meta` goes into COMPLETE, readable without DeepSpeed.
    Never overwrites a complete tag (use `suffix` to save again at the same step). Returns the tag."""
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step, suffix)
    if os.path.isfile(os.path.join(root, tag, COMPLETE)):
        return tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(root, tag, f"rng_rank{rank}.pt"))
    # COMPLETE must never reach the disk before the data it vouches for (a node losing power
    # right after a save would otherwise leave a 'complete' tag of empty files).
    fsync_tree(os.path.join(root, tag))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        # The best tag as of this save, so that a rollback to this tag can restore the pointer.
        best = tag if is_best else read_pointer(root, "best")
        _atomic_write_text(os.path.join(root, tag, COMPLETE), json.dumps(dict(meta or {}, step=step, best=best)))
        _atomic_write_text(os.path.join(root, "latest"), tag)
        if is_best:
            _atomic_write_text(os.path.join(root, "best"), tag)
        prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def prune(root: str, keep_last: int) -> None:
    """Removes complete tags beyond the newest `keep_last` (sparing `best` and the rollback
    target) and incomplete ones.

    Called on rank 0 after every rank finished saving, so an incomplete tag is a killed save.
    """
    keep = set(complete_tags(root)[-keep_last:])
    for spared in (read_pointer(root, "best"), rollback_target(root)):
        if spared:
            keep.add(spared)
    for tag in os.listdir(root):
        path = os.path.join(root, tag)
        if tag.startswith("step_") and os.path.isdir(path) and tag not in keep:
            shutil.rmtree(path, ignore_errors=True)


def discard_after(root: str, target: str) -> list[str]:
    """Collective. Removes every tag newer than `target` (a rollback abandons the steps they hold:
    left in place, resume would pick them, and the replayed steps could not save under their
    names), points `latest` at `target` and `best` at the best tag as of `target`. Returns the
    removed tags (on rank 0; the others return [])."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    removed: list[str] = []
    if rank == 0:
        removed = sorted(t for t in os.listdir(root) if t.startswith("step_") and t > target)
        # COMPLETE goes first: a crash half way leaves incomplete tags, which resume ignores.
        for tag in removed:
            marker = os.path.join(root, tag, COMPLETE)
            if os.path.isfile(marker):
                os.remove(marker)
        for tag in removed:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        _atomic_write_text(os.path.join(root, "latest"), target)
        best = read_meta(root, target).get("best")
        if best and os.path.isfile(os.path.join(root, best, COMPLETE)):
            _atomic_write_text(os.path.join(root, "best"), best)
        elif os.path.isfile(os.path.join(root, "best")) and read_pointer(root, "best") is None:
            os.remove(os.path.join(root, "best"))
    if dist.is_initialized():
        dist.barrier()
    return removed


def load(engine, run_dir: str, tag: str, load_optimizer_states: bool = True) -> dict[str, Any]:
    """Loads `tag` into the engine and this rank's RNG states; returns the client state."""
    root = checkpoint_root(run_dir)
    _, client_state = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=False, load_module_strict=True)
    if client_state is None:
        raise RuntimeError(f"{os.path.join(root, tag)}: DeepSpeed could not load this checkpoint; "
                           "remove the tag directory to fall back to the previous one")
    load_rng_state(root, tag)
    return client_state


def load_rng_state(root: str, tag: str) -> None:
    """This rank's RNG states as saved in `tag` (if it has them)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
