"""The optimizer state of a ZeRO-0 tag, loaded by dwnet into an optimizer DeepSpeed does not wrap
(the fused step's `FusedAdamW`), whichever optimizer wrote it.

Without ZeRO, DeepSpeed keeps the optimizer's `state_dict()` in the model-states file and hands it
to the loading optimizer's `load_state_dict` as it is. Tags from before the fused step (dwnet up to
8f48e96) were written by other optimizers:
- fp32: torch's AdamW, held by DeepSpeed as it is: the same format (its kernel flags are the
  loading optimizer's business);
- bf16 (and fp16): DeepSpeed's low-precision wrapper (`FP16_UnfusedOptimizer`, bf16 mode at ZeRO-0):
  the inner AdamW's state over fp32 master copies of the weights under `optimizer_state_dict`, the
  masters under `fp32_groups`, the loss scale (unused in bf16). The module holds only bf16 copies.
torch's `load_state_dict` cannot read the wrapper's dict (KeyError: 'param_groups'); `load_into`
unwraps it: the masters become the weights, the moments and step counts carry over unchanged.
What it cannot read stops the resume in one line (`OptimizerStateError`), never a fresh optimizer.
"""
from __future__ import annotations

from typing import Any

import torch

from dwnet.errors import UserError

# The keys of DeepSpeed's low-precision wrapper's state dict that hold the inner optimizer's state
# and the fp32 master weights (deepspeed.runtime.fp16.unfused_optimizer.FP16_UnfusedOptimizer).
WRAPPED_STATE = "optimizer_state_dict"
MASTER_WEIGHTS = "fp32_groups"


class OptimizerStateError(UserError):
    """A tag's optimizer state cannot be carried into this run's optimizer; names the tag and the fix."""


def unwrap(saved: Any) -> tuple[dict[str, Any], list[list[torch.Tensor]] | None, str]:
    """(torch optimizer state dict, fp32 master weights per param group or None, format name) of
    the optimizer state a ZeRO-0 tag holds; ValueError naming what it holds when unknown."""
    if isinstance(saved, dict) and {"state", "param_groups"} <= saved.keys():
        return saved, None, "torch"
    if isinstance(saved, dict) and {WRAPPED_STATE, MASTER_WEIGHTS} <= saved.keys():
        return saved[WRAPPED_STATE], saved[MASTER_WEIGHTS], "DeepSpeed's low-precision wrapper"
    held = "nothing" if saved is None else f"keys {', '.join(map(str, saved))}" if isinstance(saved, dict) \
        else type(saved).__name__
    raise ValueError(f"an optimizer state in a format this dwnet cannot read (it holds {held})")


def load_into(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> str:
    """Loads the optimizer state `saved` by the tag `where` into `optimizer`, the fp32 master weights
    (when the wrapper kept them) into its parameters; returns the format it was in."""
    try:
        state, masters, kind = unwrap(saved)
        _check_layout(optimizer, state, masters)
    except ValueError as err:
        raise OptimizerStateError(
            f"{where}: {err}; its weights and AdamW moments cannot be carried into this run's optimizer. "
            "relaunch with engine.precision=fp32 to continue from its weights with fresh optimizer moments, "
            "or resume it with the dwnet version that wrote it") from None
    if masters is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():  # the module was loaded from the bf16 copies: the masters replace them
            for param, master in zip(params, (m for group in masters for m in group), strict=True):
                param.copy_(master)
    optimizer.load_state_dict(state)
    return kind


def _check_layout(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                  masters: list[list[torch.Tensor]] | None) -> None:
    """ValueError unless `state` (and `masters`) were saved for parameters shaped and grouped as
    `optimizer`'s: torch checks only the counts, a wrong order would load moments onto other tensors."""
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"{len(saved_groups)} parameter groups, this run's optimizer has {len(groups)}")
    if masters is not None and len(masters) != len(groups):
        raise ValueError(f"{len(masters)} groups of fp32 master weights, this run's optimizer has {len(groups)}")
    index = 0
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        name = group.get("name", i)
        if "name" in saved and saved["name"] != name:
            raise ValueError(f"parameter group {i} is {saved['name']!r}, this run's is {name!r}")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{len(saved['params'])} tensors in parameter group {name!r}, "
                             f"this run has {len(group['params'])}")
        if masters is not None and len(masters[i]) != len(group["params"]):
            raise ValueError(f"{len(masters[i])} fp32 master weights in parameter group {name!r}, "
                             f"this run has {len(group['params'])}")
        for j, (param, key) in enumerate(zip(group["params"], saved["params"], strict=True)):
            for tensor in (state["state"].get(key, {}).get("exp_avg"), masters[i][j] if masters else None):
                if tensor is not None and tensor.shape != param.shape:
                    raise ValueError(f"tensor {index} is {tuple(tensor.shape)}, this run's parameter "
                                     f"{tuple(param.shape)}")
            index += 1
