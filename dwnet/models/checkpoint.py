"""Loading released (official-format) and exported checkpoints with errors that say what is wrong."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .dwnet import checkpoint_filter_fn


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not belong to the model it is loaded into."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state_dict inside an official `{'model': sd}` file, an exported file or a bare sd."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found; pass the path to a .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointMismatchError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err}); "
            "re-download or re-export it") from err
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict with a 'model' state_dict, got {type(obj).__name__}")
    return checkpoint_filter_fn(obj, None)


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Loads a released/exported checkpoint into `model`, in place, and returns it.

    With strict=True a mismatch raises CheckpointMismatchError naming the missing, unexpected and
    wrongly-shaped keys, which usually means the wrong model name or number of classes.
    With strict=False only the tensors whose name and shape fit are loaded (`load_backbone`).
    """
    state_dict = read_state_dict(path)
    if strict:
        return load_state_dict_checked(model, state_dict, str(path), strict=True)
    load_backbone(model, state_dict, str(path))
    return model


def load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Loads every tensor of `state_dict` whose name and shape match `model` (the backbone, for
    fine-tuning on another label set); the rest of `model` keeps its initialisation.

    Returns the model's keys left as they were. Raises CheckpointMismatchError when under half of
    the backbone's weights fit: that is a checkpoint of another architecture, not another head.
    """
    own = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    backbone = {k: p.numel() for k, p in model.named_parameters() if not k.startswith(f"{classifier}.")}
    loaded = sum(n for k, n in backbone.items() if k in fitting)
    if loaded * 2 < sum(backbone.values()):
        raise CheckpointMismatchError(
            f"{source}: only {loaded:,} of {sum(backbone.values()):,} backbone weights of {type(model).__name__} "
            "fit by name and shape; check the model name (dynamic vs static, tiny vs base)")
    model.load_state_dict(fitting, strict=False)
    return [k for k in own if k not in fitting]


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                            strict: bool = True) -> nn.Module:
    """`model.load_state_dict` with load_checkpoint's one-line error; `source` names where the
    weights came from in that error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if wrong_shape or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatch: {_preview(wrong_shape, 3)}")
        raise CheckpointMismatchError(
            f"{source}: does not fit {type(model).__name__} ({'; '.join(parts)}); check the model name, "
            "dynamic vs static and num_classes (use strict=False to load a backbone for fine-tuning)")
    model.load_state_dict(state_dict, strict=strict)
    return model
