"""Consolidated fp32 weights from a DeepSpeed checkpoint, in the official release format."""
from __future__ import annotations

import glob
import os
from typing import Any

import torch

from dwnet.atomic_io import atomic_open

from dwnet.finite import check_state_dict

from . import checkpointing
from .layout import (BEST, COMPLETE, LATEST, MODEL_STATES_FILES, MODEL_STATES_SUFFIX, OPTIM_STATES_GLOB,
                     checkpoint_root, complete_tags)


def _module_states_file(tag_dir: str) -> str:
    for name in MODEL_STATES_FILES:
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(tag_dir, "*" + MODEL_STATES_SUFFIX)))
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states file; is this a checkpoint tag directory?")
    return found[0]


def read_client_state(root: str, tag: str) -> dict[str, Any]:
    """The DeepSpeed module-states dict of a tag (client state keys live at its top level)."""
    return torch.load(_module_states_file(os.path.join(root, tag)), map_location="cpu", weights_only=False)


def consolidated_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state_dict of the whole model: fp32 master weights where DeepSpeed keeps them
    (ZeRO 1-3, bf16/fp16 optimizers) merged over the saved module (which holds the buffers)."""
    return _consolidate(root, tag, read_client_state(root, tag))


def _consolidate(root: str, tag: str, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    # From model states already loaded, so that export_official reads the (whole-module) file once.
    module = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    has_master_weights = glob.glob(os.path.join(root, tag, OPTIM_STATES_GLOB))
    zero_stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    low_precision = any(states.get("ds_config", {}).get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    if has_master_weights and (zero_stage > 0 or low_precision):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        master = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        module.update({k: v.float() for k, v in master.items()})
    return module


def export_official(root: str, tag: str, out_path: str, extra: dict[str, Any] | None = None) -> str:
    """Writes `{'model': fp32 state_dict, 'epoch', 'max_accuracy'}` atomically; returns out_path.
    Raises NonFiniteModelError (nothing written) if any tensor of the model is NaN or Inf."""
    states = read_client_state(root, tag)
    progress = states.get("progress", {})
    model = _consolidate(root, tag, states)
    others = [t for t in complete_tags(root) if t != tag]
    fix = "export another tag with --checkpoint-tag" + (f" (complete: {', '.join(others)})" if others else "")
    check_state_dict(model, os.path.join(root, tag), fix=fix)
    payload = {"model": model, "epoch": progress.get("epoch", 0),
               "max_accuracy": progress.get("best_top1", -1.0)}
    payload.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_open(out_path, "wb") as fh:
        torch.save(payload, fh)
    return out_path


def resolve_tag(run_dir: str, which: str = "best") -> str:
    """'best', 'latest' or an explicit tag of the run directory's checkpoints, checked readable
    (DamagedCheckpointError names the damaged file)."""
    root = checkpoint_root(run_dir)
    if which in (BEST, LATEST):
        tag = checkpointing.pointer(root, which)
    else:
        tag = which if os.path.isfile(os.path.join(root, which, COMPLETE)) else None
    if tag is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint ({which}); train first or pass --checkpoint-tag")
    checkpointing.check_readable(root, tag)
    return tag
