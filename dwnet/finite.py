"""Is a model finite? The checks behind "nothing non-finite is saved, exported, evaluated or
called best", shared by the trainer, the export and the eval command."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


class NonFiniteModelError(ValueError):
    """A model or checkpoint holds NaN or Inf values; the message names the tensors and the fix."""


def floating_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating parameter and buffer of `module`, by state_dict name. Under ZeRO-3 a rank
    holds only its partition of each parameter (`ds_tensor`): that partition is what it checks."""
    for name, param in module.named_parameters():
        tensor = getattr(param, "ds_tensor", param)
        if tensor.is_floating_point():
            yield name, tensor.detach()
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            yield name, buf


def per_tensor_norms(tensors: Sequence[torch.Tensor], ord: float = 2.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `ord`-norm of each of `tensors`, as one 1-D `dtype` tensor on the first one's device, in
    one multi-tensor norm per device and dtype (no host sync, no operator call per tensor). Shared
    by the finiteness checks (inf-norm) and the fused steps' global gradient norms (2-norm)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    if not groups:
        return torch.zeros(0, dtype=dtype)
    first = tensors[0].device
    norms = [torch.stack(torch._foreach_norm(group, ord, dtype=dtype)).to(first) for group in groups.values()]
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One boolean device tensor (no host sync): are all `tensors` free of NaN and Inf?

    The max-abs norm keeps NaN and Inf and, unlike a sum, cannot overflow on finite values."""
    return torch.isfinite(per_tensor_norms(tensors, float("inf"))).all()


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding a NaN or Inf (a slow, per-tensor pass for messages)."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def preview(names: Sequence[str], limit: int = 3) -> str:
    """'48 tensors (a, b, c, ...)': enough to recognise the pattern on one line."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown})"


def check_state_dict(state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Raises NonFiniteModelError naming `source`, the bad tensors and `fix` if any is not finite."""
    bad = nonfinite_names(state.items())
    if bad:
        raise NonFiniteModelError(f"{source}: {preview(bad)} hold NaN or Inf values; {fix}")


def nonfinite_on_any_rank(modules: Sequence[tuple[str, nn.Module]]) -> tuple[bool, list[str]]:
    """Collective when a process group exists. Returns (whether any rank holds a non-finite tensor
    in any of `modules`, the names of this rank's bad tensors prefixed by the module label)."""
    named = [(f"{label}{name}", t) for label, module in modules for name, t in floating_tensors(module)]
    local_ok = all_finite([t for _, t in named])
    bad_ranks = (~local_ok).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad_ranks)
    if not bad_ranks.item():
        return False, []
    return True, nonfinite_names(named) if not bool(local_ok) else []
