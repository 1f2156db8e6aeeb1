"""Crash-safe DeepSpeed checkpoints: a tag counts only once every rank finished writing it.

The files are named in `layout.py`. A SIGKILL mid-save leaves a tag without COMPLETE, which resume
ignores and the next start-up or save removes; a save that fails (a full disk) removes its
half-written tag at once.

A tag saved while a non-finite episode was open (skipped steps in the guard's window) records the
episode's first skipped step (`TagMeta.episode`): it is never a rollback target, and pruning always
spares the newest tag without it, the rollback target.

A tag whose files cannot be loaded is renamed `step_N.damaged` (never deleted: it may be
recoverable by hand); damaged tags are neither resumed, nor pruned, nor discarded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import random
import shutil
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dwnet.atomic_io import fsync_tree
from dwnet.data.rng import derive_key, seed_global_generators

from . import optimizer_state, universal
from .layout import (BEST, BF16_ZERO_SHARDS_GLOB, COMPLETE, DAMAGED, LATEST, MODEL_STATES_SUFFIX, POINTERS,
                     DamagedCheckpointError, TagMeta, complete_tags, is_complete, is_tag_name, newest_complete_tag,
                     rng_file, tag_for_step, write_text)
from .space import CheckpointSpaceError, out_of_space, space_message

_NEW_RANK = 0x4E52  # RNG key part for ranks a resumed run has and the saving run had not


def read_pointer(root: str, name: str) -> str | None:
    """The tag a pointer file names, or None when the file is missing, unreadable (binary garbage)
    or names no complete tag: a damaged pointer must never stop a save or a resume."""
    try:
        with open(os.path.join(root, name), encoding="utf-8") as fh:
            tag = fh.read(4096).strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return tag if is_complete(root, tag) else None


def rebuilt_pointer(root: str, name: str) -> str | None:
    """`latest` or `best` as the tags themselves say: the newest complete tag, and the best tag
    recorded in its COMPLETE metadata."""
    newest = newest_complete_tag(root)
    if name == LATEST or newest is None:
        return newest
    meta = TagMeta.read_or_none(root, newest)
    best = meta.best if meta else None
    return best if is_complete(root, best) else None


def pointer(root: str, name: str) -> str | None:
    """`latest`/`best`, rebuilt from the tags when the pointer file is absent or damaged."""
    return read_pointer(root, name) or rebuilt_pointer(root, name)


def repair_pointers(root: str) -> list[str]:
    """Rank 0: rewrites `latest`/`best` files that are missing, damaged or stale from the tags;
    returns the names of those that existed (a missing one is not news)."""
    repaired = []
    for name in POINTERS:
        path = os.path.join(root, name)
        if read_pointer(root, name) is not None:
            continue
        existed = os.path.lexists(path)
        tag = rebuilt_pointer(root, name)
        if tag is not None:
            write_text(path, tag)
        elif existed:
            os.remove(path)
        if existed:
            repaired.append(name)
    return repaired


def is_clean(root: str, tag: str) -> bool:
    """Saved with no non-finite episode open (tags from before this key existed count as clean)."""
    return TagMeta.read(root, tag).clean


def rollback_target(root: str) -> str | None:
    """The newest complete tag saved outside any non-finite episode. Every tag saved after the
    current episode's first skip is marked, so this tag predates that skip. A tag with an
    unreadable COMPLETE is not a target."""
    metas = {t: TagMeta.read_or_none(root, t) for t in complete_tags(root)}
    clean = [t for t, meta in metas.items() if meta is not None and meta.clean]
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


def save(engine, root: str, step: int, client_state: dict[str, Any], keep_last: int,
         is_best: bool = False, meta: TagMeta | None = None, suffix: str = "") -> str:
    """Collective: every rank must call it. `meta` goes into COMPLETE (its step and best set here).
    Never overwrites a complete tag (use `suffix` to save again at the same step). Returns the tag."""
    tag = tag_for_step(step, suffix)
    if os.path.isfile(os.path.join(root, tag, COMPLETE)):
        return tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        engine.save_checkpoint(root, tag=tag, client_state={**client_state, **universal.CLIENT_STATE},
                               save_latest=False)
        torch.save(rng_state(), rng_file(root, tag, rank))
        # COMPLETE must never reach the disk before the data it vouches for (a node losing power
        # right after a save would otherwise leave a 'complete' tag of empty files).
        fsync_tree(os.path.join(root, tag))
    except (OSError, RuntimeError) as err:
        # The half-written tag goes at once: left in place it eats the space the rerun needs.
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        if out_of_space(root, err):
            raise CheckpointSpaceError(space_message(root, tag, err)) from err
        raise
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        # The best tag as of this save, so that a rollback to this tag can restore the pointer.
        best = tag if is_best else pointer(root, BEST)
        dataclasses.replace(meta or TagMeta(step), step=step, best=best).write(root, tag)
        write_text(os.path.join(root, LATEST), tag)
        if is_best:
            write_text(os.path.join(root, BEST), tag)
        repair_pointers(root)
        prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def remove_incomplete(root: str) -> list[str]:
    """Rank 0 at start-up, when no save can be running: removes tags without COMPLETE (saves
    killed or failed half way), which can never be resumed and hold disk space."""
    if not os.path.isdir(root):
        return []
    removed = sorted(t for t in os.listdir(root) if is_tag_name(t) and os.path.isdir(os.path.join(root, t))
                     and not os.path.isfile(os.path.join(root, t, COMPLETE)))
    for tag in removed:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    return removed


def prune(root: str, keep_last: int) -> None:
    """Removes complete tags beyond the newest `keep_last` (sparing `best` and the rollback
    target) and incomplete ones.

    Called on rank 0 after every rank finished saving, so an incomplete tag is a killed save.
    """
    keep = set(complete_tags(root)[-keep_last:])
    for spared in (pointer(root, BEST), rollback_target(root)):
        if spared:
            keep.add(spared)
    for tag in os.listdir(root):
        path = os.path.join(root, tag)
        if is_tag_name(tag) and os.path.isdir(path) and tag not in keep:
            shutil.rmtree(path, ignore_errors=True)
    universal.remove_orphans(root, keep)


def discard_after(root: str, target: str) -> list[str]:
    """Collective. Removes every tag newer than `target` (a rollback abandons the steps they hold:
    left in place, resume would pick them, and the replayed steps could not save under their
    names), points `latest` at `target` and `best` at the best tag as of `target`. Returns the
    removed tags (on rank 0; the others return [])."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    removed: list[str] = []
    if rank == 0:
        removed = sorted(t for t in os.listdir(root) if is_tag_name(t) and t > target)
        # COMPLETE goes first: a crash half way leaves incomplete tags, which resume ignores.
        for tag in removed:
            marker = os.path.join(root, tag, COMPLETE)
            if os.path.isfile(marker):
                os.remove(marker)
        for tag in removed:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        universal.remove_orphans(root, set(complete_tags(root)))
        write_text(os.path.join(root, LATEST), target)
        meta = TagMeta.read_or_none(root, target)
        best = meta.best if meta else None
        if is_complete(root, best):
            write_text(os.path.join(root, BEST), best)
        elif os.path.isfile(os.path.join(root, BEST)) and read_pointer(root, BEST) is None:
            os.remove(os.path.join(root, BEST))
    if dist.is_initialized():
        dist.barrier()
    return removed


def damaged_file(path: str) -> str | None:
    """Why `path` (a torch.save zip archive) cannot be read, or None: every member's CRC is checked,
    so a truncated copy or a flipped bit is found without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return f"member {bad} fails its CRC check" if bad else None


def tag_files(root: str, tag: str) -> list[str]:
    tag_dir = os.path.join(root, tag)
    return sorted(os.path.join(tag_dir, f) for f in os.listdir(tag_dir) if f.endswith(".pt"))


def verify_tag(root: str, tag: str, rank: int = 0, world_size: int = 1) -> str | None:
    """'FILE: problem' for the first unreadable file of `tag` among this rank's share (every
    world_size-th file, so that ranks split the reading), or None."""
    try:
        TagMeta.read(root, tag)
        files = tag_files(root, tag)
    except (DamagedCheckpointError, OSError) as err:
        return str(err)
    if not any(f.endswith(MODEL_STATES_SUFFIX) for f in files):
        return f"{os.path.join(root, tag)}: no model states file"
    for path in files[rank::world_size]:
        problem = damaged_file(path)
        if problem:
            return f"{path}: {problem}"
    return None


def check_readable(root: str, tag: str) -> None:
    """DamagedCheckpointError naming the file when `tag` cannot be read (for --eval/--export)."""
    problem = verify_tag(root, tag)
    if problem:
        others = [t for t in complete_tags(root) if t != tag]
        raise DamagedCheckpointError(
            f"checkpoint {tag} is damaged: {problem}; use another tag with --checkpoint-tag"
            + (f" (complete: {', '.join(others)})" if others else ""))


def move_aside(root: str, tag: str) -> str:
    """Renames a damaged tag to `step_N.damaged` (never deletes it); returns the new name."""
    name, k = tag + DAMAGED, 1
    while os.path.lexists(os.path.join(root, name)):
        k += 1
        name = f"{tag}.{k}{DAMAGED}"
    os.rename(os.path.join(root, tag), os.path.join(root, name))
    repair_pointers(root)  # `latest`/`best` may have named the tag
    return name


def load(engine, root: str, tag: str, *, seed: int, reshard: bool = False) -> dict[str, Any]:
    """Loads `tag` into the engine (from its universal copy when `reshard`: another world size or
    ZeRO stage) and this rank's RNG states; returns the client state."""
    # An optimizer DeepSpeed does not wrap (ZeRO-0's fused step) gets its state from dwnet, which
    # also reads what DeepSpeed's own ZeRO-0 optimizers wrote before it (`optimizer_state`).
    unwrapped = isinstance(engine.optimizer, torch.optim.Optimizer)
    with _zero_shards_named_as_saved(engine, os.path.join(root, tag), active=not (unwrapped or reshard)):
        _, client_state = engine.load_checkpoint(
            universal.universal_root(root) if reshard else root, tag=tag, load_optimizer_states=not unwrapped,
            load_lr_scheduler_states=False, load_module_strict=True)
    if client_state is None:
        raise DamagedCheckpointError(f"{os.path.join(root, tag)}: DeepSpeed could not load this checkpoint; "
                                     f"rename the tag directory to {tag}{DAMAGED} to fall back to the previous one")
    if unwrapped:
        optimizer_state.load_into(engine.optimizer, client_state.pop("optimizer", None), os.path.join(root, tag))
    elif engine.zero_optimization_stage() in (1, 2):
        # DeepSpeed restores the fp32 master partitions and leaves the weights as the module file
        # holds them, bf16 copies if DeepSpeed's bf16 wrote it: the weights become the masters
        # (a collective: every rank loads).
        engine.optimizer.update_lp_params()
    load_rng_state(root, tag, seed)
    return client_state


@contextlib.contextmanager
def _zero_shards_named_as_saved(engine, tag_dir: str, active: bool) -> Iterator[None]:
    """DeepSpeed names a tag's ZeRO optimizer shards after the bf16 mode of the engine that wrote it
    (`bf16_zero_pp_rank_*` with its bf16 on) and reads them under the name its own mode gives: a tag
    of DeepSpeed's bf16 (`engine.fused_step=false`, or dwnet before the flat ZeRO step) read by the
    autocast engine, or the reverse, is "not found", and DeepSpeed's fallback to the other name
    never fires (its name lookup never reports a miss). While loading, the engine reads the names
    the tag has (`_get_zero_ckpt_prefix` of this one engine instance)."""
    saved_bf16 = bool(glob.glob(os.path.join(tag_dir, BF16_ZERO_SHARDS_GLOB)))
    if not active or not engine.zero_optimization() or saved_bf16 == engine.bfloat16_enabled():
        yield
        return
    own = engine._get_zero_ckpt_prefix
    engine._get_zero_ckpt_prefix = lambda dp_rank, bf16_mode: own(dp_rank, bf16_mode=saved_bf16)
    try:
        yield
    finally:
        del engine._get_zero_ckpt_prefix  # saves keep the engine's own names


def load_rng_state(root: str, tag: str, seed: int) -> None:
    """This rank's RNG states as saved in `tag`; a rank the saving run did not have gets states
    derived from (seed, rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = rng_file(root, tag, rank)
    if os.path.isfile(path):
        set_rng_state(torch.load(path, weights_only=False))
    else:
        seed_global_generators(derive_key(_NEW_RANK, seed, rank))
