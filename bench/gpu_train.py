#!/usr/bin/env python
"""Training speed through the real engine: DWNet vs ConvNeXt-T and Swin-T, one process, one device.

    python bench/gpu_train.py --data /tmp/photos --out gpu_train.json            # GPU defaults
    python bench/gpu_train.py --data /tmp/tiny --device cpu --image-size 32 \\
        --models dwnet_femto convnext_tiny swin_tiny_patch4_window7_224 --batch 8  # CPU dry run

Each model is built by `dwnet.engine.Trainer` from a run config (AdamW groups, scaled LRs, the
generated DeepSpeed config at the requested precision and ZeRO stage, the recipe's augmentations
on the device) and timed twice with the same engine:
  * loader: batches from the real train loader (decode, crop, RandAugment, erasing, mixup);
    `data_time_fraction` is the share of the timed wall-clock spent waiting for the next batch;
  * engine: the same step on batches already on the device, the model's own ceiling.
MFU = forward FLOPs per image (2 per multiply-add, `torch.utils.flop_counter`) x 3 (forward +
backward) x images/s / the device's dense peak (datasheet for known GPUs; the matmul measured in
this run is reported beside it). Ratios compare models measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any
from collections.abc import Callable

from common import machine_info, table

import torch  # noqa: E402

from gpu_measure import (  # noqa: E402
    device_batches, device_peak, forward_flops, plain_torch_step, profile_step, time_engine, time_loader,
    time_other_loader)

DWNET, CONVNEXT, SWIN = "dwnet_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224"
# (numerator, denominator, target) on engine images/s, from the targets.
TARGETS = [(DWNET, SWIN, 1.3), (DWNET, CONVNEXT, 1.0)]
CAPTURED_TARGET_IPS = 6000  # dwnet_tiny, bf16, batch 128, one H200, model.compile_mode=reduce-overhead


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder tree (imagefolder backend) or train .beton (ffcv)")
    p.add_argument("--backend", choices=("imagefolder", "ffcv"), default="imagefolder")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the tree's classes)")
    p.add_argument("--out", default="gpu_train.json", help="JSON with every figure")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", nargs="+", default=[DWNET, CONVNEXT, SWIN])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--zero-stage", type=int, default=0, help="the recipes use ZeRO-0 (the fused step)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="decode workers")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per case (cudnn autotuning, workers)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case")
    p.add_argument("--profile-steps", type=int, default=3, help="steps of the first model under the profiler")
    p.add_argument("--compile", action="store_true", help="also time the first model under torch.compile")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="reduce-overhead",
                   help="model.compile_mode of that case (reduce-overhead: the step captured in CUDA graphs)")
    p.add_argument("--compare-imagefolder", metavar="TREE",
                   help="with --backend ffcv: also time the first model's loader on this ImageFolder tree")
    p.add_argument("--sweep", action="store_true",
                   help="also time the first model's engine at ZeRO 0/1/2, twice the batch, and in plain PyTorch")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip remaining cases once this is spent")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, model: str, run_dir: str, num_classes: int, compile_: bool = False,
               extra: list[str] | None = None):
    from dwnet.config import load_config

    return load_config(None, [
        f"model.name={model}", f"model.num_classes={num_classes}", f"model.compile={str(compile_).lower()}",
        f"model.compile_mode={args.compile_mode}",
        "model.channels_last=true", f"data.backend={args.backend}", f"data.train_path={args.data}",
        f"data.image_size={args.image_size}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"engine.precision={args.precision}", f"engine.zero_stage={args.zero_stage}", "optim.epochs=1000",
        f"checkpoint.dir={run_dir}", "checkpoint.every_steps=0", "checkpoint.auto_resume=false",
        "log.tensorboard=false", "log.progress=false", *(extra or [])])


def model_factory(image_size: int) -> Callable:
    """The Trainer's default factory, except that Swin needs its input size (and a window that
    fits it) at construction when it is not the 224 px it was defined for."""
    from dwnet.models import build_model

    def build(cfg):
        if not cfg.model.name.startswith("swin"):
            return build_model(cfg)
        import timm

        size_kwargs = {} if image_size == 224 else {"img_size": image_size, "window_size": max(1, min(7, image_size // 8))}
        model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes, **size_kwargs)
        from dwnet.engine.ds_config import uses_fused_step

        if cfg.engine.precision == "bf16" and not uses_fused_step(cfg.engine, "bf16"):
            # DeepSpeed's bf16 (ZeRO-3) casts parameters, not buffers: Swin's float attention-mask
            # buffer would promote the bf16 attention scores back to fp32. Autocast needs no cast.
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(torch.bfloat16)
        return model
    return build


def engine_sweep(args, name: str, device: torch.device, num_classes: int) -> list[dict[str, Any]]:
    """Engine-only img/s of `name` across ZeRO stages and batch sizes, and the plain-PyTorch step:
    separates what the model costs from what the engine adds."""
    from dwnet.engine import Trainer

    rows, batches = [], None
    # The fused step at ZeRO 0-2, and ZeRO-1 through DeepSpeed's own per-tensor step for comparison.
    cases = [(0, args.batch, True), (1, args.batch, True), (2, args.batch, True), (1, 2 * args.batch, True),
             (1, args.batch, False)]
    for zero_stage, batch, fused in cases:
        with tempfile.TemporaryDirectory() as run_dir:
            case = argparse.Namespace(**{**vars(args), "zero_stage": zero_stage, "batch": batch})
            overrides = [] if fused else ["engine.fused_step=false"]
            trainer = Trainer(run_config(case, name, run_dir, num_classes, extra=overrides), 0, 1, device,
                              model_factory=model_factory(args.image_size))
            data = device_batches(trainer)
            if batch == args.batch:
                batches = data
            timing = time_engine(trainer, data, max(2, args.warmup // 2), args.steps, device)
            label = f"engine ZeRO-{zero_stage}, batch {batch}" + ("" if fused else ", DeepSpeed's own step")
            rows.append({"case": label, **timing})
            del trainer, data
    if batches is not None:
        targets_hard = [(x, t.argmax(1) if t.ndim == 2 else t) for x, t in batches]
        rows.append({"case": f"plain PyTorch (autocast, fused AdamW), batch {args.batch}",
                     **plain_torch_step(name, args, device, num_classes, targets_hard)})
    return rows


def bench_model(args, name: str, device: torch.device, peak: float, num_classes: int, *, compile_: bool = False,
                profile_steps: int = 0) -> dict[str, Any]:
    from dwnet.engine import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = run_config(args, name, run_dir, num_classes, compile_)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, 0, 1, device, model_factory=model_factory(args.image_size))
        module = trainer.engine.module
        result: dict[str, Any] = {
            "model": name + (f" (torch.compile, {args.compile_mode})" if compile_ else ""),
            "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
            "fwd_gflops_per_image": forward_flops(module, args.image_size, device, trainer.dtype) / 1e9,
            "build_s": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        result["loader"] = time_loader(trainer, args.warmup, args.steps, device)
        result["warmup_and_loader_s"] = time.perf_counter() - t0
        if args.compare_imagefolder and profile_steps:  # the first model: the other backend on the same engine
            result["loader_imagefolder"] = time_other_loader(trainer, args, num_classes, device)
        batches = device_batches(trainer)
        result["engine"] = time_engine(trainer, batches, max(2, args.warmup // 2), args.steps, device)
        for case in ("loader", "engine"):
            flops = 3 * result["fwd_gflops_per_image"] * 1e9 * result[case]["images_per_s"]
            result[case]["mfu"] = flops / peak
        if profile_steps:
            result["profile"] = profile_step(trainer, batches, profile_steps, device)
        del trainer, module, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def save(results: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=2)
    os.replace(tmp, path)


def report(results: dict[str, Any]) -> str:
    rows = []
    for r in results["models"]:
        loader, engine = r["loader"], r["engine"]
        rows.append([r["model"], f"{r['params_m']:.1f}", f"{r['fwd_gflops_per_image']:.3g}",
                     f"{engine['images_per_s']:.0f}", f"{100 * engine['mfu']:.1f}%",
                     f"{loader['images_per_s']:.0f}", f"{100 * loader['mfu']:.1f}%",
                     f"{100 * loader['data_time_fraction']:.1f}%", f"{engine.get('peak_memory_gb', float('nan')):.1f}"])
    lines = [] if not rows else [table(["model", "params M", "fwd GFLOP/img", "engine img/s", "engine MFU", "loader img/s", "loader MFU",
                    "data time", "peak GiB"], rows)]
    for r in results["models"]:
        if "loader_imagefolder" in r:
            other = r["loader_imagefolder"]
            lines.append(f"{r['model']} loader: ffcv {r['loader']['images_per_s']:.0f} img/s (data time "
                         f"{100 * r['loader']['data_time_fraction']:.1f}%) vs ImageFolder+PIL {other['images_per_s']:.0f} "
                         f"img/s (data time {100 * other['data_time_fraction']:.1f}%): "
                         f"{r['loader']['images_per_s'] / other['images_per_s']:.2f}x")
    if results.get("ratios"):
        lines.append(table(["ratio (engine img/s)", "value", "target", "result"],
                           [[k, f"{v['value']:.2f}x", f">= {v['target']}", v["result"]]
                            for k, v in results["ratios"].items()]))
    if results.get("profile"):
        prof = results["profile"]
        lines.append(f"profile of {prof['model']}: device busy {prof['device_busy_ms_per_step']:.1f} ms of "
                     f"{prof['wall_ms_per_step']:.1f} ms per step (under the profiler); top kernels:")
        lines.append(table(["kernel", "calls", "ms/step", "share"],
                           [[k["name"], k["calls"], f"{k['ms_per_step']:.2f}", f"{100 * k['share']:.1f}%"]
                            for k in prof["rows"]]))
        lines.append("host: " + ", ".join(f"{k['name']} {k['ms_per_step']:.1f} ms" for k in prof["host_top"][:6]))
    if results.get("sweep"):
        plain = next((r["images_per_s"] for r in results["sweep"] if r["case"].startswith("plain PyTorch")), None)
        lines.append(table(["engine sweep", "img/s", "step ms", "vs plain PyTorch (target >= 0.95 at ZeRO-0)"],
                           [[r["case"], f"{r['images_per_s']:.0f}", f"{r['step_ms']:.1f}",
                             f"{r['images_per_s'] / plain:.2f}x" if plain else "-"] for r in results["sweep"]]))
    for r in results["models"]:
        if "reduce-overhead" in r["model"]:
            lines.append(f"captured step ({r['model']}): {r['engine']['images_per_s']:.0f} img/s from device memory "
                         f"(target >= {CAPTURED_TARGET_IPS})")
    for name, err in results.get("failed", {}).items():
        lines.append(f"FAILED {name}: {err}")
    for name in results.get("skipped", []):
        lines.append(f"skipped (budget): {name}")
    return "\n".join(lines)


def run_case(args, results: dict[str, Any], name: str, device: torch.device, num_classes: int, deadline: float,
             *, compile_: bool = False, profile: bool = False) -> None:
    """Benchmarks one model into `results` (or records why not) and saves the JSON: a later case that
    hangs must not cost the figures already taken."""
    label = name + (f" (torch.compile, {args.compile_mode})" if compile_ else "")
    if time.monotonic() > deadline:
        results["skipped"].append(label)
        return
    print(f"[gpu_train] {label} ...", flush=True)
    try:
        r = bench_model(args, name, device, results["peak"]["peak_used"], num_classes, compile_=compile_,
                        profile_steps=args.profile_steps if profile else 0)
    except Exception as err:  # one broken case must not cost the figures of the others
        results["failed"][label] = f"{type(err).__name__}: {err}"[:500]
        print(f"[gpu_train] {label} FAILED: {results['failed'][label]}", flush=True)
        return
    if "profile" in r:
        results["profile"] = {"model": label, **r.pop("profile")}
    results["models"].append(r)
    save(results, args.out)
    print(f"[gpu_train] {label}: engine {r['engine']['images_per_s']:.0f} img/s, loader "
          f"{r['loader']['images_per_s']:.0f} img/s", flush=True)


def ratios(results: dict[str, Any], first: str) -> dict[str, dict[str, Any]]:
    """The targets' ratios of engine images/s; the first model stands in for dwnet_tiny (dry runs)."""
    speed = {r["model"]: r["engine"]["images_per_s"] for r in results["models"]}
    out = {}
    for num, den, target in TARGETS:
        num = first if num == DWNET else num
        if num != den and num in speed and den in speed:
            value = speed[num] / speed[den]
            out[f"{num} / {den}"] = {"value": value, "target": target, "result": "PASS" if value >= target else "MISS"}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu for a dry run")
    from torchvision.datasets import ImageFolder

    from dwnet.distributed import init_distributed, training_device

    init_distributed()
    device = training_device() if args.device == "cuda" else torch.device("cpu")
    num_classes = args.num_classes or (len(ImageFolder(args.data).classes) if args.backend == "imagefolder" else 1000)
    results: dict[str, Any] = {"machine": machine_info(args.device), "peak": device_peak(device),
                               "settings": vars(args), "models": [], "failed": {}, "skipped": []}
    for i, name in enumerate(args.models):
        run_case(args, results, name, device, num_classes, deadline, profile=i == 0)
    if args.sweep and time.monotonic() < deadline:  # before compile: the sweep says more per second
        try:
            results["sweep"] = engine_sweep(args, args.models[0], device, num_classes)
        except Exception as err:
            results["failed"]["sweep"] = f"{type(err).__name__}: {err}"[:500]
    if args.compile:
        run_case(args, results, args.models[0], device, num_classes, deadline, compile_=True)
    results["ratios"] = ratios(results, args.models[0])
    save(results, args.out)
    print(report(results))
    peak = results["peak"]
    print(f"peak for MFU: {peak['peak_used'] / 1e12:.3g} TFLOP/s ({peak['peak_source']}); matmul {peak['matmul']} "
          f"measured {peak['measured_flops'] / 1e12:.3g} TFLOP/s on {peak['device']}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
