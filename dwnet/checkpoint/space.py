"""Disk space for checkpoints: what a save failing for lack of room looks like, the one-line
message it gets, and the room two tags of a run need (checked before training starts)."""
from __future__ import annotations

import copy
import errno
import os

import torch

from dwnet.errors import UserError

from .layout import checkpoint_root, free_bytes, human_size, newest_complete_tag, tag_size


class CheckpointSpaceError(UserError):
    """A save failed for lack of space; names the path, the free space and the last tag's size."""


def out_of_space(root: str, err: BaseException) -> bool:
    """Did this save fail for lack of space? ENOSPC, or torch's zip writer's 'unexpected pos'
    (what a full disk looks like from torch.save), or less free space than the newest tag needs."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(err) or "unexpected pos" in str(err):
        return True
    newest = newest_complete_tag(root)
    try:
        return newest is not None and free_bytes(root) < tag_size(root, newest)
    except OSError:
        return False


def space_message(root: str, tag: str, err: BaseException) -> str:
    newest = newest_complete_tag(root)
    last = f"the last tag {newest} takes {human_size(tag_size(root, newest))}" if newest else "no earlier tag"
    intact = f"; {newest} is intact and a relaunch resumes from it" if newest else ""
    cause = (str(err).splitlines() or [type(err).__name__])[0].strip()
    return (f"checkpoint {os.path.join(root, tag)} not written: no space left on its disk "
            f"({human_size(free_bytes(root))} free, {last}); the half-written tag was removed{intact}; "
            f"free space or set checkpoint.dir to a larger disk (the save failed with: {cause})")


def space_for_two_tags(cfg) -> tuple[int, str] | None:
    """(bytes, basis) two checkpoint tags of this run take: from the newest complete tag, or else
    from the parameter count (fp32 weights and two Adam moments, plus fp32 master weights under
    bf16/fp16 and the EMA's copy). None when neither can be estimated."""
    root = checkpoint_root(cfg.checkpoint.dir)
    newest = newest_complete_tag(root)
    if newest is not None:
        return 2 * tag_size(root, newest), f"the newest tag {newest}"
    try:
        from dwnet.models import build_model

        meta_cfg = copy.deepcopy(cfg)
        meta_cfg.model.pretrained = None
        with torch.device("meta"):  # shapes only: no memory, no weights
            params = sum(p.numel() for p in build_model(meta_cfg).parameters())
    except Exception:  # noqa: BLE001 - an estimate is a courtesy; no estimate means no check
        return None
    per_param = 12 + (4 if cfg.engine.precision != "fp32" else 0) + (4 if cfg.engine.ema else 0)
    return 2 * params * per_param, f"{cfg.model.name}'s {params:,} parameters with their optimizer state"
