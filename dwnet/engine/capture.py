"""How `model.compile` compiles the training engine, and whether the step can be captured.

`model.compile_mode: reduce-overhead` is torch.compile's CUDA-graph mode: the compiled forward and
backward are replayed as graphs, so a step costs a handful of launches instead of thousands. The
rest of the step is already a few launches at ZeRO 0-2 (`fused_step`, `flat_zero`). Where the configuration
cannot be captured, `compile_options` says why in one line and the engine is compiled without
graphs, which still fuses kernels.
"""
from __future__ import annotations

import torch


def compile_options(mode: str, device: torch.device, zero_stage: int) -> tuple[dict, str | None]:
    """torch.compile keyword arguments for the engine, and the line that says why the step is not
    captured (None when it is, or when no capture was asked for). Shapes are static: training
    batches all have one size, and a smaller last evaluation batch gets a graph of its own instead
    of turning every graph symbolic."""
    static = {"dynamic": False}
    if mode == "default":
        return static, None
    if mode != "reduce-overhead":
        return {**static, "mode": mode}, None
    if device.type != "cuda":
        return static, (f"model.compile_mode=reduce-overhead captures CUDA graphs, which need a CUDA device; on "
                        f"{device.type} the model is compiled without them")
    if zero_stage == 3:
        return static, ("model.compile_mode=reduce-overhead: ZeRO-3 gathers each layer's parameters in hooks "
                        "during the forward, which a CUDA graph cannot replay; compiled without graphs "
                        "(engine.zero_stage<=2 captures)")
    return {**static, "mode": "reduce-overhead"}, None


def begin_captured_step(captured: bool) -> None:
    """Marks a new optimizer step for CUDA-graph replay: the previous step's graph outputs (loss,
    gradients) have been consumed, so their memory may be reused."""
    if captured:
        torch.compiler.cudagraph_mark_step_begin()
