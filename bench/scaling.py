#!/usr/bin/env python
"""Training step throughput through the real DeepSpeed engine: data-parallel scaling on CPU,
images/s and MFU on a GPU.

    python bench/scaling.py                     # CPU: dwnet_nano, ZeRO-1 fp32, world size 1 vs 2
    python bench/scaling.py --device cuda       # GPU: dwnet_tiny bf16, batch 128, images/s + MFU

Each measurement spawns its ranks (gloo or nccl on 127.0.0.1), builds model, AdamW groups and
DeepSpeed config with dwnet's own code, runs `--warmup` steps, then times `--steps` steps of
forward + backward + optimizer step on a synthetic batch (rank 0's median step time; the
all-reduce synchronises the ranks). On CPU the configurations are run interleaved, `--rounds`
times each, and the median is reported:

  ws1 x 2 threads   one rank using both cores (intra-op threading)
  ws1 x 1 thread    one rank on one core: the per-core baseline
  ws2 x 1 thread    two ranks, one core each

Weak scaling (fixed batch per rank). Efficiency = images/s(ws2) / (2 x images/s(ws1 x 1 thread));
on a 2-core machine ws2 also competes with ws1 x 2 threads for the same two cores.

On CUDA, MFU = achieved training FLOP/s / peak dense bf16 FLOP/s, with training FLOPs ~= 3 x
forward FLOPs and forward FLOPs = 2 x `dwnet.models.count_macs`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from common import build_engine, print_machine, set_rank_env, table

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# Peak dense bf16 tensor-core TFLOP/s by GPU name (first matching key wins; vendor datasheets).
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="default: dwnet_nano on CPU, dwnet_tiny on CUDA")
    p.add_argument("--batch", type=int, default=None, help="images per rank (default: 32 CPU, 128 CUDA)")
    p.add_argument("--image-size", type=int, default=None, help="default: 64 CPU, 224 CUDA")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 CPU, bf16 CUDA")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 8 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="CPU: interleaved repetitions of each configuration")
    p.add_argument("--world-sizes", type=int, nargs="+", default=None,
                   help="CUDA: world sizes to run (default: 1); CPU runs 1 and 2")
    p.add_argument("--peak-tflops", type=float, default=None, help="CUDA: peak dense bf16 TFLOP/s per GPU")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.model = args.model or ("dwnet_tiny" if cuda else "dwnet_nano")
    args.batch = args.batch or (128 if cuda else 32)
    args.image_size = args.image_size or (224 if cuda else 64)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (30 if cuda else 8)
    return args


def worker(rank: int, world_size: int, threads: int, port: int, args: argparse.Namespace, out: str) -> None:
    set_rank_env(rank, world_size, port, DS_ACCELERATOR=args.device, DWNET_NUM_THREADS=str(threads))
    from dwnet.distributed import init_distributed
    from dwnet.timing import timed  # after DS_ACCELERATOR is set: it loads DeepSpeed

    init_distributed()
    engine, num_classes = build_engine(args.model, precision=args.precision, zero_stage=args.zero_stage,
                                       batch=args.batch, image_size=args.image_size,
                                       run_dir=os.path.join(os.path.dirname(out), "run"), world_size=world_size)
    device = engine.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # Synthetic batch, channels_last as the trainer's loaders deliver it.
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch,), device=device)
    phases: dict[str, list[float]] = {"step_s": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
    for step in range(args.warmup + args.steps):
        with timed(device) as forward:
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        with timed(device) as backward:
            engine.backward(loss)  # ZeRO 1/2 reduce gradients in backward hooks: communication is in here
        with timed(device) as optimizer:
            engine.step()
        if step >= args.warmup:
            seconds = (forward.seconds, backward.seconds, optimizer.seconds)
            for key, value in zip(phases, (sum(seconds), *seconds)):
                phases[key].append(value)
    if rank == 0:
        info = {key: statistics.median(values) for key, values in phases.items()}
        info["threads"] = torch.get_num_threads()
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        with open(out, "w") as fh:
            json.dump(info, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run(world_size: int, threads: int, args: argparse.Namespace) -> dict:
    from dwnet.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(world_size, threads, free_port(), args, out), nprocs=world_size, join=True)
        with open(out) as fh:
            return json.load(fh)


def cpu_scaling(args: argparse.Namespace) -> None:
    configs = {"ws1 x 2 threads": (1, 2), "ws1 x 1 thread": (1, 1), "ws2 x 1 thread": (2, 1)}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for name in order:
            world_size, threads = configs[name]
            results[name].append(run(world_size, threads, args))
            print(f"  round {round_ + 1}: {name}: {results[name][-1]['step_s']:.3f} s/step", flush=True)
    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("step_s", "forward_s", "backward_s", "optimizer_s")}
           for name, runs in results.items()}
    samples = {name: [r["step_s"] for r in runs] for name, runs in results.items()}
    ips = {name: configs[name][0] * args.batch / statistics.median(s) for name, s in samples.items()}
    rows = [[name, configs[name][0], configs[name][1], f"{med[name]['step_s']:.3f}", f"{med[name]['forward_s']:.3f}",
             f"{med[name]['backward_s']:.3f}", f"{med[name]['optimizer_s']:.3f}", f"{ips[name]:.1f}"]
            for name in samples]
    print()
    print(table(["configuration", "ranks", "threads/rank", "step s", "forward s", "backward s (+reduce)",
                 "optimizer s", "images/s"], rows))
    print("(medians over rounds of rank 0's median step; images/s = ranks x batch / step)")
    eff = ips["ws2 x 1 thread"] / (2 * ips["ws1 x 1 thread"])
    print(f"\nscaling efficiency ws2 vs 2 x ws1 (1 thread each): {eff:.2f}")
    print(f"ws2 x 1 thread / ws1 x 2 threads (same two cores, DDP vs intra-op threads): "
          f"{ips['ws2 x 1 thread'] / ips['ws1 x 2 threads']:.2f}")
    print("(2 cores bound this: at world size 2 each rank gets 1 thread, and other processes share the cores)")


def peak_tflops(gpu: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in gpu.lower():
            return value
    return None


def cuda_throughput(args: argparse.Namespace) -> None:
    import timm

    import dwnet  # noqa: F401
    from dwnet.models import count_macs

    macs = count_macs(timm.create_model(args.model, pretrained=False), (3, args.image_size, args.image_size))
    train_flops_per_image = 3 * 2 * macs
    rows = []
    for world_size in args.world_sizes or [1]:
        result = run(world_size, 1, args)
        ips_gpu = args.batch / result["step_s"]  # rank 0's median step; ranks are in lock-step
        achieved = ips_gpu * train_flops_per_image / 1e12
        peak = peak_tflops(result["gpu"], args.peak_tflops)
        mfu = f"{achieved / peak:.1%}" if peak else "n/a (give --peak-tflops)"
        rows.append([result["gpu"], world_size, f"{ips_gpu * world_size:.0f}", f"{ips_gpu:.0f}", f"{achieved:.0f}",
                     f"{peak:.0f}" if peak else "?", mfu])
    print(f"\n{args.model} @ {args.image_size}px, {args.precision}, ZeRO-{args.zero_stage}, batch {args.batch}/GPU; "
          f"forward {macs / 1e9:.2f} GMACs/image, training ~ 3 x 2 x MACs = {train_flops_per_image / 1e9:.1f} GFLOP/image")
    print(table(["GPU", "GPUs", "images/s", "images/s/GPU", "TFLOP/s/GPU", "peak bf16", "MFU"], rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_machine(args.device)
    print(f"{args.model} @ {args.image_size}px, {args.precision}, ZeRO-{args.zero_stage}, batch {args.batch}/rank, "
          f"{args.warmup} warm-up + {args.steps} timed steps per run")
    if args.device == "cuda":
        cuda_throughput(args)
    else:
        cpu_scaling(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
