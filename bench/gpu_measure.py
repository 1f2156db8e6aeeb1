"""The measurement pieces of bench/gpu_train.py: forward FLOPs and the device's peak (for MFU), and
the timed steps through a built Trainer -- fed by the real loader, replayed on device batches, under
the profiler -- plus the plain-PyTorch step that is the baseline for engine overhead."""
from __future__ import annotations

import dataclasses
import time
from typing import Any
from collections.abc import Callable

import torch
import torch.nn as nn

from dwnet.timing import seconds_per_call, synchronize, timed

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
DATASHEET_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12}


def forward_flops(model: torch.nn.Module, image_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs (2 per multiply-add) of one forward pass per image, counted at batch 2 in eval mode, in
    `dtype`: the weights' own, or autocast to it over fp32 weights (bf16 at ZeRO 0-2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    weights = next(model.parameters()).dtype
    x = torch.randn(2, 3, image_size, image_size, device=device, dtype=weights)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != weights), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2


def device_peak(device: torch.device) -> dict[str, Any]:
    """The dense peak MFU is quoted against, and a matmul measured now for comparison."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = 1024, torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    measured = 2 * n ** 3 / seconds_per_call(lambda: a @ b, device, reps, warmup=3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in DATASHEET_BF16_PEAK.items() if k in name), None)
    return {"device": name, "matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}", "measured_flops": measured,
            "datasheet_bf16_flops": datasheet, "peak_used": datasheet or measured,
            "peak_source": "datasheet dense bf16" if datasheet else "matmul measured in this run"}


def _step(trainer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step exactly as the training loop takes it: forward, backward, DeepSpeed's
    update, and the non-finite guard's collective decision (buffer snapshot included)."""
    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = trainer.micro_step(images, targets, 0)
        trainer.finish_step()
        return loss
    return step


def _endless_batches(loader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def time_loader(trainer, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Steps fed by the real train loader; the wait for each batch is data time."""
    step, batches = _step(trainer), _endless_batches(trainer.train_loader)
    for _ in range(warmup):
        step(*next(batches))
    waited = 0.0
    with timed(device) as elapsed:
        for _ in range(steps):
            t = time.perf_counter()
            images, targets = next(batches)
            waited += time.perf_counter() - t
            loss = step(images, targets)
    seconds = elapsed.seconds
    batches.close()
    return {"images_per_s": steps * trainer.cfg.data.batch_size / seconds, "step_ms": 1e3 * seconds / steps,
            "data_time_fraction": waited / seconds, "final_loss": loss.item()}


def time_other_loader(trainer, args, num_classes: int, device: torch.device) -> dict[str, float]:
    """The loader timing again with the ImageFolder backend (PIL in DataLoader workers), for the ratio."""
    from dwnet.data import build_train_loader

    cfg = trainer.cfg
    data = dataclasses.replace(cfg.data, backend="imagefolder", train_path=args.compare_imagefolder)
    own = trainer.train_loader
    trainer.train_loader = build_train_loader(data, cfg.augment, num_classes=num_classes, rank=0, world_size=1,
                                              seed=cfg.engine.seed, device=device, channels_last=True)
    try:
        return time_loader(trainer, args.warmup, args.steps, device)
    finally:
        trainer.train_loader = own


def device_batches(trainer, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real augmented batches from the loader, kept on the device and replayed."""
    batches = _endless_batches(trainer.train_loader)
    out = [tuple(t.clone() for t in next(batches)) for _ in range(count)]
    batches.close()
    return out


def time_engine(trainer, batches, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    step = _step(trainer)
    for i in range(warmup):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timed(device) as elapsed:
        for i in range(steps):
            loss = step(*batches[i % len(batches)])
    seconds = elapsed.seconds
    result = {"images_per_s": steps * trainer.cfg.data.batch_size / seconds, "step_ms": 1e3 * seconds / steps,
              "final_loss": loss.item()}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def profile_step(trainer, batches, steps: int, device: torch.device, rows: int = 15) -> dict[str, Any]:
    """Where a step's time goes: the kernels (CUDA) or operators (CPU) with the most device time,
    the device's busy time per step (sum over all kernels) and the host's costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = _step(trainer)
    with timed(device) as elapsed, profile(activities=activities) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
        synchronize(device)  # inside the profiled window: the kernels it records have finished
    wall_ms = 1e3 * elapsed.seconds / steps
    averages = [e for e in prof.key_averages() if not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = [e for e in averages if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only (operators report their kernels' time too): they sum to busy time
        kernels = [e for e in kernels if e.device_type == torch.autograd.DeviceType.CUDA] or kernels
    total = sum(getattr(e, attr) for e in kernels) or 1.0
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms_per_step": wall_ms,  # under the profiler: slower than the timed runs
        "device_busy_ms_per_step": total / 1e3 / steps,
        "rows": [{"name": e.key[:90], "calls": e.count, "ms_per_step": getattr(e, attr) / 1e3 / steps,
                  "share": getattr(e, attr) / total} for e in kernels[:rows]],
        "host_top": [{"name": e.key[:90], "calls": e.count, "ms_per_step": e.self_cpu_time_total / 1e3 / steps}
                     for e in host[:10]],
    }


def plain_torch_step(name: str, args, device: torch.device, num_classes: int, batches) -> dict[str, float]:
    """The named baseline for engine overhead: the same model and batches in plain PyTorch, as timm's
    train.py runs it (fp32 weights, bf16 autocast, fused AdamW, clipping), no DeepSpeed."""
    import timm

    from dwnet.engine.optim import param_groups

    model = timm.create_model(name, num_classes=num_classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(images, targets):
        with autocast:
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(max(2, args.warmup // 2)):
        step(*batches[i % len(batches)])
    with timed(device) as elapsed:
        for i in range(args.steps):
            step(*batches[i % len(batches)])
    seconds = elapsed.seconds
    return {"images_per_s": args.steps * args.batch / seconds, "step_ms": 1e3 * seconds / args.steps}
