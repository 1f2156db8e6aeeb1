#!/usr/bin/env python
"""Model throughput: DWNet vs ConvNeXt-T and Swin-T, training (fwd+bwd) and inference, one process.

    python bench/model.py                      # CPU defaults: batch 8, fp32, channels_last
    python bench/model.py --device cuda --batch 128 --dtype bf16
    python bench/model.py --compile            # also torch.compile the BN-fused DWNet

Every case is timed interleaved with the others (round-robin, several rounds) and ratios are
medians of per-round ratios, so machine noise mostly cancels. Targets: dwnet_tiny fwd+bwd >=
1.0x convnext_tiny and >= 1.3x swin_tiny; BN-fused dwnet_tiny inference >= 1.5x unfused.
A MISS is printed, not hidden; the exit code is 0 unless --strict.
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

from common import interleaved_times, median, print_machine, round_ratios, spread, table, verdict

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dwnet  # noqa: E402,F401  (registers the DWNet models with timm)
from dwnet.models import count_macs, fuse_batchnorm  # noqa: E402
from dwnet.models.fusion import FusedDWNetBlock  # noqa: E402

GEMM, GEMM_N = "matmul 2048^3", 2048
MODELS = ("dwnet_tiny", "dynamic_dwnet_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (numerator, denominator, what, target) over the "train" or "infer" results.
TARGETS = [
    ("train", "dwnet_tiny", "convnext_tiny", "dwnet_tiny fwd+bwd / convnext_tiny", 1.0),
    ("train", "dwnet_tiny", "swin_tiny_patch4_window7_224", "dwnet_tiny fwd+bwd / swin_tiny", 1.3),
    ("infer", "dwnet_tiny fused", "dwnet_tiny", "dwnet_tiny fused / unfused inference", 1.5),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8: CPU-sized)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and input (default on)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median taken)")
    p.add_argument("--iters", type=int, default=1, help="steps per case per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fused dwnet_tiny")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the fwd+bwd table")
    p.add_argument("--no-infer", dest="infer", action="store_false", help="skip the inference table")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    return p.parse_args(argv)


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    # Swin's patch embedding asserts the input size it was built for.
    kwargs = {"img_size": args.image_size} if name.startswith("swin") else {}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        F.cross_entropy(model(x).float(), y).backward()
        model.zero_grad(set_to_none=True)
    return step


def bench_train(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    models = {name: build(name, args).train() for name in args.models}
    cases = {name: train_step(m, x, y) for name, m in models.items()}
    return interleaved_times(cases, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=args.device)


def bench_infer(args: argparse.Namespace, x: torch.Tensor) -> dict[str, list[float]]:
    models: dict[str, torch.nn.Module] = {}
    for name in args.models:
        models[name] = build(name, args).eval()
        if name.startswith(("dwnet", "dynamic_dwnet")):
            # Non-trivial running statistics, so that the fused model computes something real.
            with torch.no_grad():
                for mod in models[name].modules():
                    if isinstance(mod, torch.nn.BatchNorm2d):
                        mod.running_mean.normal_(0, 0.1)
                        mod.running_var.uniform_(0.5, 2.0)
            models[f"{name} fused"] = fuse_batchnorm(copy.deepcopy(models[name]).eval())
    if "dwnet_tiny fused" in models:
        # The fused model without its oneDNN post-op path: what BN folding alone buys.
        eager = copy.deepcopy(models["dwnet_tiny fused"])
        for block in eager.modules():
            if isinstance(block, FusedDWNetBlock):
                block.onednn_ok = False
        models["dwnet_tiny fused eager-ops"] = eager
    if args.compile and "dwnet_tiny fused" in models:
        models["dwnet_tiny fused compiled"] = torch.compile(models["dwnet_tiny fused"])
    with torch.inference_mode():
        for name in [n for n in models if " " in n]:
            base = models[name.split(" ")[0]]
            diff = (models[name](x).float() - base(x).float()).abs().max().item()
            print(f"  check: {name} vs unfused max |diff| = {diff:.2e}")
        cases = {name: (lambda m=m: m(x)) for name, m in models.items()}
        # A large matmul in the same rounds: the machine's attainable GEMM rate right now.
        a = torch.randn(GEMM_N, GEMM_N, device=args.device, dtype=DTYPES[args.dtype])
        cases[GEMM] = lambda: a @ a
        return interleaved_times(cases, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch < 2 and args.train:
        raise SystemExit("--batch must be >= 2 for training (dynamic DWNet's kernel BatchNorm sees one value per sample)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine(args.device)
    print(f"batch {args.batch}, {args.image_size}px, {args.dtype}, {args.device}, "
          f"channels_last={args.channels_last}, {args.repeats} rounds x {args.iters} iters (median)")
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=DTYPES[args.dtype])
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    results: dict[str, dict[str, list[float]]] = {}
    if args.train:
        results["train"] = bench_train(args, x, y)
    if args.infer:
        results["infer"] = bench_infer(args, x)

    names = [n for n in dict.fromkeys(n for r in results.values() for n in r) if n != GEMM]
    gflop = {name: 2 * count_macs(build(name.split(" ")[0], args), (3, args.image_size, args.image_size)) / 1e9
             for name in dict.fromkeys(n.split(" ")[0] for n in names)}
    rows = []
    for name in names:
        row: list[object] = [name]
        for kind, flop_factor in (("train", 3), ("infer", 1)):  # fwd+bwd ~ 3x forward FLOPs
            s = results.get(kind, {}).get(name)
            ips = args.batch / median(s) if s else 0.0
            row += [f"{ips:.1f}", f"{spread(s):.0%}", f"{ips * gflop[name.split(' ')[0]] * flop_factor:.0f}"] if s else ["-"] * 3
        rows.append(row)
    print()
    print(table(["model", "fwd+bwd img/s", "spread", "GFLOP/s", "inference img/s", "spread", "GFLOP/s"], rows))
    print("spread = (max - min) / median of the per-round times; GFLOP/s = 2 x MACs (count_macs) x img/s")
    if GEMM in results.get("infer", {}):
        peak = 2 * GEMM_N ** 3 / median(results["infer"][GEMM]) / 1e9
        print(f"{GEMM} ({args.dtype}, same rounds): {peak:.0f} GFLOP/s = the attainable rate for GEMM-bound work;")
        for name in ("dwnet_tiny", "dwnet_tiny fused"):
            if name in results["infer"]:
                achieved = args.batch / median(results["infer"][name]) * gflop["dwnet_tiny"]
                print(f"  {name} inference runs at {achieved / peak:.0%} of it")
    print()

    ratio_rows, missed = [], False
    checks = TARGETS + [("infer", "dynamic_dwnet_tiny fused", "dynamic_dwnet_tiny", "dynamic_dwnet_tiny fused / unfused", None),
                        ("infer", "dwnet_tiny fused eager-ops", "dwnet_tiny", "dwnet_tiny fused eager-ops / unfused", None),
                        ("infer", "dwnet_tiny fused", "dwnet_tiny fused eager-ops", "dwnet_tiny fused / fused eager-ops", None),
                        ("infer", "dwnet_tiny fused compiled", "dwnet_tiny fused", "fused compiled / fused", None)]
    for kind, num, den, what, target in checks:
        r = results.get(kind, {})
        if num not in r or den not in r:
            continue
        mid, lo, hi = round_ratios(r[den], r[num])  # time(den) / time(num) = speed(num) / speed(den)
        status = "-" if target is None else verdict(mid, target)
        missed |= status == "MISS"
        ratio_rows.append([what, f"{mid:.2f}x", f"{lo:.2f}-{hi:.2f}", "-" if target is None else f">= {target}", status])
    print(table(["ratio (same run, median of per-round ratios)", "ratio", "range", "target", "result"], ratio_rows))
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
