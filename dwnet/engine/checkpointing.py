"""Crash-safe DeepSpeed checkpoints: a tag counts only once every rank finished writing it.

Layout under the run directory:
    checkpoints/step_00001200/...   DeepSpeed files of that tag, plus
        COMPLETE                    written by rank 0 after a barrier: the tag is whole
        rng_rank{r}.pt              each rank's RNG states (exact resume)
    checkpoints/latest              name of the newest complete tag (atomic replace)
    checkpoints/best                name of the tag with the best validation top-1
A SIGKILL mid-save leaves a tag without COMPLETE, which resume ignores and the next start-up or
save removes; a save that fails (a full disk) removes its half-written tag at once.

COMPLETE holds the tag's metadata. A tag saved while a non-finite episode was open (skipped steps
in the guard's window) carries `nonfinite_episode` (the episode's first skipped step): it is never a
rollback target, and pruning always spares the newest tag without it, the rollback target.

A tag whose files cannot be loaded is renamed `step_N.damaged` (never deleted: it may be
recoverable by hand); damaged tags are neither resumed, nor pruned, nor discarded.
COMPLETE also records the run's identity (IDENTITY), which a resume compares with its config.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dwnet.atomic_io import atomic_open, fsync_tree
from dwnet.data.rng import derive_key, seed_global_generators
from dwnet.errors import UserError

from . import checkpoint_space, universal

COMPLETE = "COMPLETE"
EPISODE = "nonfinite_episode"  # COMPLETE key: first skipped step of the episode open at save time
IDENTITY = "identity"  # COMPLETE key: model, num_classes, global batch, data sizes, ZeRO stage, precision
DAMAGED = ".damaged"  # suffix of a tag moved aside because a file of it could not be loaded
_NEW_RANK = 0x4E52  # RNG key part for ranks a resumed run has and the saving run had not


class DamagedCheckpointError(UserError):
    """A file of a complete tag cannot be read (disk error, truncated copy); names the file."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for_step(step: int, suffix: str = "") -> str:
    """Tags sort by step; a suffixed tag of the same step sorts after (is newer than) the plain one."""
    return f"step_{step:08d}" + (f".{suffix}" if suffix else "")


def _atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def is_tag_name(name: str) -> bool:
    """A live tag directory name (not a damaged one moved aside, not a path)."""
    return name.startswith("step_") and not name.endswith(DAMAGED) and os.sep not in name


def complete_tags(root: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if is_tag_name(t) and os.path.isfile(os.path.join(root, t, COMPLETE))]
    return sorted(tags)


def _is_complete(root: str, tag: Any) -> bool:
    return isinstance(tag, str) and is_tag_name(tag) and os.path.isfile(os.path.join(root, tag, COMPLETE))


def read_pointer(root: str, name: str) -> str | None:
    """The tag a pointer file names, or None when the file is missing, unreadable (binary garbage)
    or names no complete tag: a damaged pointer must never stop a save or a resume."""
    try:
        with open(os.path.join(root, name), encoding="utf-8") as fh:
            tag = fh.read(4096).strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return tag if _is_complete(root, tag) else None


def rebuilt_pointer(root: str, name: str) -> str | None:
    """`latest` or `best` as the tags themselves say: the newest complete tag, and the best tag
    recorded in its COMPLETE metadata."""
    newest = newest_complete_tag(root)
    if name == "latest" or newest is None:
        return newest
    best = safe_meta(root, newest).get("best")
    return best if _is_complete(root, best) else None


def pointer(root: str, name: str) -> str | None:
    """`latest`/`best`, rebuilt from the tags when the pointer file is absent or damaged."""
    return read_pointer(root, name) or rebuilt_pointer(root, name)


def repair_pointers(root: str) -> list[str]:
    """Rank 0: rewrites `latest`/`best` files that are missing, damaged or stale from the tags;
    returns the names of those that existed (a missing one is not news)."""
    repaired = []
    for name in ("latest", "best"):
        path = os.path.join(root, name)
        if read_pointer(root, name) is not None:
            continue
        existed = os.path.lexists(path)
        tag = rebuilt_pointer(root, name)
        if tag is not None:
            _atomic_write_text(path, tag)
        elif existed:
            os.remove(path)
        if existed:
            repaired.append(name)
    return repaired


def read_meta(root: str, tag: str) -> dict[str, Any]:
    """COMPLETE's metadata; DamagedCheckpointError when it is unreadable."""
    path = os.path.join(root, tag, COMPLETE)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedCheckpointError(f"{path}: unreadable ({type(err).__name__})") from err
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path}: not a JSON object")
    return meta


def safe_meta(root: str, tag: str) -> dict[str, Any]:
    """read_meta, or {} for a damaged COMPLETE (for pruning and pointers, which must not crash)."""
    try:
        return read_meta(root, tag)
    except DamagedCheckpointError:
        return {}


def newest_complete_tag(root: str) -> str | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


def is_clean(root: str, tag: str) -> bool:
    """Saved with no non-finite episode open (tags from before this key existed count as clean)."""
    return read_meta(root, tag).get(EPISODE) is None


def rollback_target(root: str) -> str | None:
    """The newest complete tag saved outside any non-finite episode. Every tag saved after the
    current episode's first skip is marked, so this tag predates that skip. A tag with an
    unreadable COMPLETE is not a target."""
    clean = [t for t in complete_tags(root) if safe_meta(root, t) and is_clean(root, t)]
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
         is_best: bool = False, meta: dict[str, Any] | None = None, suffix: str = "") -> str:
    """Collective: every rank must call it. `meta` goes into COMPLETE, readable without DeepSpeed.
    Never overwrites a complete tag (use `suffix` to save again at the same step). Returns the tag."""
    tag = tag_for_step(step, suffix)
    if os.path.isfile(os.path.join(root, tag, COMPLETE)):
        return tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        engine.save_checkpoint(root, tag=tag, client_state={**client_state, **universal.CLIENT_STATE},
                               save_latest=False)
        torch.save(rng_state(), os.path.join(root, tag, f"rng_rank{rank}.pt"))
        # COMPLETE must never reach the disk before the data it vouches for (a node losing power
        # right after a save would otherwise leave a 'complete' tag of empty files).
        fsync_tree(os.path.join(root, tag))
    except (OSError, RuntimeError) as err:
        # The half-written tag goes at once: left in place it eats the space the rerun needs.
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        if checkpoint_space.out_of_space(root, err):
            raise checkpoint_space.CheckpointSpaceError(checkpoint_space.space_message(root, tag, err)) from err
        raise
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        # The best tag as of this save, so that a rollback to this tag can restore the pointer.
        best = tag if is_best else pointer(root, "best")
        _atomic_write_text(os.path.join(root, tag, COMPLETE), json.dumps(dict(meta or {}, step=step, best=best)))
        _atomic_write_text(os.path.join(root, "latest"), tag)
        if is_best:
            _atomic_write_text(os.path.join(root, "best"), tag)
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
    for spared in (pointer(root, "best"), rollback_target(root)):
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
        _atomic_write_text(os.path.join(root, "latest"), target)
        best = safe_meta(root, target).get("best")
        if _is_complete(root, best):
            _atomic_write_text(os.path.join(root, "best"), best)
        elif os.path.isfile(os.path.join(root, "best")) and read_pointer(root, "best") is None:
            os.remove(os.path.join(root, "best"))
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
        read_meta(root, tag)
        files = tag_files(root, tag)
    except (DamagedCheckpointError, OSError) as err:
        return str(err)
    if not any(f.endswith("model_states.pt") for f in files):
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
    _, client_state = engine.load_checkpoint(
        universal.universal_root(root) if reshard else root, tag=tag, load_optimizer_states=True,
        load_lr_scheduler_states=False, load_module_strict=True)
    if client_state is None:
        raise DamagedCheckpointError(f"{os.path.join(root, tag)}: DeepSpeed could not load this checkpoint; "
                                     f"rename the tag directory to {tag}{DAMAGED} to fall back to the previous one")
    load_rng_state(root, tag, seed)
    return client_state


def load_rng_state(root: str, tag: str, seed: int) -> None:
    """This rank's RNG states as saved in `tag`; a rank the saving run did not have gets states
    derived from (seed, rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        seed_global_generators(derive_key(_NEW_RANK, seed, rank))
