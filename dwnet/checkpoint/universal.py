"""Resharding a checkpoint for another number of ranks or another ZeRO stage, through DeepSpeed's
universal checkpoint format (`deepspeed.checkpoint.ds_to_universal`, loaded with
`checkpoint.load_universal`).

The conversion of `checkpoints/<tag>` is written to `checkpoints/universal/<tag>.partial` and
renamed to `checkpoints/universal/<tag>` once complete, by rank 0 while the others wait: a killed
conversion leaves only a `.partial` directory, which the next attempt removes and redoes. The
original tag is only read, never modified. The converted copy is a cache: `prune` removes it with
its tag.

What the format does not carry comes from the tag itself: module buffers (BatchNorm statistics)
and EMA from the client state, RNG states from the tag's `rng_rank{r}.pt`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS, PARAM_SHAPES,
                                            UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from dwnet.atomic_io import fsync_tree
from dwnet.errors import UserError

from .layout import MODEL_STATES_FILES, OPTIM_STATES_GLOB, free_bytes, human_size, tag_size
from .space import out_of_space

UNIVERSAL_DIR = "universal"
PARTIAL = ".partial"
DONE = "UNIVERSAL_COMPLETE"
LOG = "conversion.log"
# In every tag's client state: what ds_to_universal requires of a checkpoint (pure data
# parallelism has no tensor-parallel patterns to declare), so no --inject_missing_state is needed.
CLIENT_STATE = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


class ConversionError(UserError):
    """The universal conversion of a tag failed; the tag itself is untouched."""


def universal_root(root: str) -> str:
    return os.path.join(root, UNIVERSAL_DIR)


def has_partitioned_optimizer(tag_dir: str) -> bool:
    """ZeRO 1-3 (and bf16 at ZeRO-0 in older DeepSpeed) write per-rank optimizer shards; a tag
    without them holds its whole optimizer state in the model-states file, loadable on any world."""
    return bool(glob.glob(os.path.join(tag_dir, OPTIM_STATES_GLOB)))


def is_converted(root: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(universal_root(root), tag, DONE))


def convert(root: str, tag: str, workers: int | None = None) -> str:
    """Rank 0: the universal copy of `tag` (converted now unless done before); its directory."""
    final = os.path.join(universal_root(root), tag)
    if is_converted(root, tag):
        return final
    partial = final + PARTIAL
    for stale in (partial, final):  # a killed conversion, or a copy without its marker
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(partial)
    source = os.path.join(root, tag)
    needed, free = tag_size(root, tag), free_bytes(partial)  # the copy holds what the tag holds, unsharded
    if free < needed:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConversionError(
            f"converting {source} for the new rank layout needs about {human_size(needed)} in {universal_root(root)}, "
            f"{human_size(free)} are free; the tag is untouched; free space and relaunch, or relaunch on the tag's "
            "own world size and ZeRO stage")
    log_path = os.path.join(universal_root(root), tag + ".log")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
           "--output_folder", partial, "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    try:
        with open(log_path, "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise ConversionError(_last_error(log_path))
        _name_metadata_file_for_every_stage(partial)
        _optimizer_state_for_every_stage(partial)
        with open(os.path.join(partial, DONE), "w") as fh:
            json.dump({"source": tag}, fh)
        fsync_tree(partial)
        os.rename(partial, final)
    except (ConversionError, OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        cause = (str(err).splitlines() or [type(err).__name__])[0].strip()
        if out_of_space(root, err):
            cause = f"no space left on its disk, {human_size(free_bytes(root))} free after cleaning up: {cause}"
        raise ConversionError(
            f"converting {source} for the new rank layout failed ({cause}); the tag is untouched and the partial "
            f"copy was removed; full output in {log_path}; fix the cause and relaunch, or relaunch on the tag's own "
            "world size and ZeRO stage") from err
    os.replace(log_path, os.path.join(final, LOG))
    return final


def _name_metadata_file_for_every_stage(folder: str) -> None:
    """A universal load reads its metadata (client state included) from the ZeRO 0-2 model-states
    file or from the ZeRO-3 one; the copy gets both names, so that the stage may change across 3
    (weights come from `zero/` either way)."""
    names = MODEL_STATES_FILES
    present = [n for n in names if os.path.isfile(os.path.join(folder, n))]
    for missing in (n for n in names if present and n not in present):
        shutil.copyfile(os.path.join(folder, present[0]), os.path.join(folder, missing))


def _optimizer_state_for_every_stage(folder: str) -> None:
    """The converter writes `zero/optimizer_state.pt` in the layout of the source's stage, and the
    Adam step either per parameter (`step.pt`, ZeRO 1-2) or in that file (ZeRO-3); each loader reads
    only its own. The copy gets both, so that ZeRO 1-2 and 3 can follow each other."""
    zero = os.path.join(folder, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = [os.path.join(zero, d) for d in sorted(os.listdir(zero)) if os.path.isfile(os.path.join(zero, d, "fp32.pt"))]
    if OPTIMIZER_STATE_DICT in state:
        # From ZeRO-3: tensors are flat and bare, the step is in this file. ZeRO 1-2 want each as
        # {"param": tensor of the parameter's shape} and the step per parameter.
        saved = torch.load(os.path.join(folder, MODEL_STATES_FILES[1]),
                                  map_location="cpu", weights_only=False)
        shapes = {name: shape for group in saved[PARAM_SHAPES] for name, shape in group.items()}
        step = next(iter(state[OPTIMIZER_STATE_DICT]["state"].values()))["step"]
        for param in params:
            name = os.path.basename(param)
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                file = os.path.join(param, f"{key}.pt")
                tensor = torch.load(file, map_location="cpu", weights_only=False)
                if torch.is_tensor(tensor) and name in shapes:
                    torch.save({PARAM: tensor.view(shapes[name])}, file)
            if name in shapes:
                torch.save(torch.as_tensor(step, dtype=torch.float32), os.path.join(param, "step.pt"))
        state.setdefault(DS_VERSION, deepspeed.__version__)
    else:  # from ZeRO 1-2: give ZeRO-3 the step where it looks for it
        step = next((torch.load(os.path.join(p, "step.pt"), weights_only=False) for p in params
                     if os.path.isfile(os.path.join(p, "step.pt"))), None)
        if step is None:
            return
        state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": state[PARAM_GROUPS]}
    torch.save(state, path)


def _last_error(log_path: str) -> str:
    """The line of the converter's output that says what went wrong."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if "Error" in line or "error" in line or "No space" in line]
    return (errors or lines or ["no output"])[-1][:300]


def convert_on_rank0(root: str, tag: str) -> str:
    """Collective: rank 0 converts, the others wait and all raise the same one-line error if it failed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    outcome: list = [None]
    if rank == 0:
        try:
            convert(root, tag)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            outcome[0] = str(err) if isinstance(err, ConversionError) else \
                f"converting {os.path.join(root, tag)} failed ({type(err).__name__}: {err}); the tag is untouched"
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise ConversionError(outcome[0])
    return os.path.join(universal_root(root), tag)


def remove_orphans(root: str, keep: set[str]) -> None:
    """Rank 0: removes converted copies (and partial ones, and logs) of tags not in `keep`."""
    base = universal_root(root)
    if not os.path.isdir(base):
        return
    for name in os.listdir(base):
        tag = name.removesuffix(PARTIAL).removesuffix(".log")
        if tag not in keep:
            path = os.path.join(base, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
