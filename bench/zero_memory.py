#!/usr/bin/env python
"""Per-rank parameter + gradient + optimizer-state memory under ZeRO 0/1/2/3, measured on CPU.

    python bench/zero_memory.py                           # dwnet_tiny, world sizes 2 and 4
    python bench/zero_memory.py --world-sizes 2 --stages 0 3

Ranks are spawned with torch.multiprocessing (gloo on 127.0.0.1) and build the real engine:
dwnet's run config, AdamW groups and DeepSpeed config -> deepspeed.initialize. After one full
step (so optimizer states exist) and a second forward+backward (so gradients are held), each
rank walks the tensors it actually holds, counting every storage once:

  params   module parameters (ZeRO-3: the local partition `p.ds_tensor`)
  grads    `p.grad` and gradient partitions held by the ZeRO optimizer
  optim    the base optimizer's state (AdamW exp_avg / exp_avg_sq)
  master   ZeRO 1-3's fp32 partition of the weights (`single_partition_of_fp32_groups` /
           `fp32_partitioned_groups_flat`): a second copy even when training in fp32
  buckets  gradient-reduction buckets (`reduce_bucket_size` elements, allocated up front; not
           in the total, most of the pages are never touched for a model this small)

Baseline: ZeRO-0 in the same run. Expectation per ZeRO paper: stage 1 = P + G + O/N,
stage 2 = P + (G + O)/N, stage 3 = (P + G + O)/N, with P, G, O the ZeRO-0 figures and O the
AdamW state; measured/expected > 1 is mostly the fp32 master partition (+P/N).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile

from common import build_engine, print_machine, set_rank_env, table

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

CATEGORIES = ("params", "grads", "optim", "master", "other", "buckets")
IN_TOTAL = ("params", "grads", "optim", "master", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dwnet_tiny")
    p.add_argument("--image-size", type=int, default=32, help="small: memory, not speed, is measured")
    p.add_argument("--batch", type=int, default=2, help="images per rank")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--detail", action="store_true", help="also list where rank 0's bytes were found")
    return p.parse_args(argv)


class Ledger:
    """Bytes per category, each tensor storage counted once (views of flat buffers included)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.items: list[tuple[int, str, str]] = []  # (bytes, category, where), for --detail

    def add(self, tensor: torch.Tensor | None, category: str, where: str = "") -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()
        self.items.append((storage.nbytes(), category, where))


def _category(path: str) -> str:
    path = path.lower()
    if "bucket" in path or "ipg" in path:
        return "buckets"
    if "grad" in path:
        return "grads"
    if "fp32" in path or "master" in path:
        return "master"
    if "param" in path or "bit16" in path or "fp16" in path:
        return "params"  # e.g. ZeRO-3's small persistent parameters, kept whole on every rank
    return "other"


def _walk(obj, path: str, ledger: Ledger, visited: set[int], depth: int = 0) -> None:
    """Every tensor reachable from `obj` through attributes, lists and dicts (not nn.Modules)."""
    if depth > 6 or id(obj) in visited or isinstance(obj, torch.nn.Module):
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ledger.add(obj, _category(path), path)
        if obj.grad is not None:
            ledger.add(obj.grad, "grads", path + ".grad")
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "dwnet", "torch.optim")):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        _walk(value, f"{path}.{key}", ledger, visited, depth + 1)


def measure(engine, stage: int) -> tuple[dict[str, int], list]:
    ledger = Ledger()
    for p in engine.module.parameters():
        ledger.add(p.ds_tensor if stage == 3 else p, "params", "module parameters")
    for p in engine.module.parameters():
        ledger.add(p.grad, "grads", "module p.grad")
    zero_opt = engine.optimizer
    base = getattr(zero_opt, "optimizer", zero_opt)
    for state in base.state.values():
        for value in state.values():
            ledger.add(value, "optim", "base optimizer state")
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(zero_opt, name, []):
            ledger.add(t, "master", f"optimizer.{name}")
            ledger.add(t.grad, "grads", f"optimizer.{name}[].grad")
    # Whatever else the ZeRO optimizer holds: gradient partitions, buckets, flat buffers.
    _walk(zero_opt, "optimizer", ledger, visited={id(base.state)})
    merged: dict[tuple[str, str], int] = {}
    for nbytes, category, where in ledger.items:
        key = (category, re.sub(r"\.\d+", "[]", where))  # one line per list, not per element
        merged[key] = merged.get(key, 0) + nbytes
    return ledger.bytes, sorted(((b, c, w) for (c, w), b in merged.items()), reverse=True)


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    set_rank_env(rank, world_size, port, DS_ACCELERATOR="cpu", DWNET_NUM_THREADS="1")
    from dwnet.distributed import init_distributed

    init_distributed()
    results, details = {}, {}
    for stage in args.stages:
        engine, num_classes = build_engine(args.model, precision="fp32", zero_stage=stage, batch=args.batch,
                                           image_size=args.image_size, run_dir=os.path.join(out_dir, "run"),
                                           world_size=world_size)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        y = torch.randint(0, num_classes, (args.batch,))
        for step in range(2):  # full step: optimizer states exist; then fwd+bwd: gradients are held
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            if step == 0:
                engine.step()
        results[stage], details[stage] = measure(engine, stage)
        engine.step()
        del engine
        gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"bytes": results, "detail": details}, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_world(world_size: int, args: argparse.Namespace) -> list[dict]:
    from dwnet.distributed import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world_size, free_port(), args, out_dir), nprocs=world_size, join=True)
        ranks = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                ranks.append({key: {int(k): v for k, v in value.items()} for key, value in json.load(fh).items()})
    return ranks


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_machine()
    print(f"{args.model} @ {args.image_size}px, fp32, AdamW, batch {args.batch}/rank, gloo on CPU; "
          "MiB per rank (max over ranks)")
    for world_size in args.world_sizes:
        ranks = run_world(world_size, args)
        per_stage = {s: {c: max(r["bytes"][s][c] for r in ranks) for c in CATEGORIES} for s in args.stages}
        totals = {s: sum(v[c] for c in IN_TOTAL) for s, v in per_stage.items()}
        base = per_stage.get(0)
        rows = []
        for stage, v in per_stage.items():
            row = [f"ZeRO-{stage}", *(mib(v[c]) for c in IN_TOTAL), mib(totals[stage]), mib(v["buckets"])]
            if base:
                P, G, O = base["params"], base["grads"], base["optim"]  # noqa: N806, E741
                n = world_size
                expected = {0: P + G + O, 1: P + G + O / n, 2: P + (G + O) / n, 3: (P + G + O) / n}[stage]
                master = P / n if stage else 0  # DeepSpeed's fp32 weight partition, also in fp32 runs
                row += [f"{totals[stage] / totals[0]:.3f}", mib(expected), f"{totals[stage] / expected:.2f}",
                        f"{totals[stage] / (expected + master):.2f}"]
            rows.append(row)
        headers = ["stage", "params", "grads", "optim", "master", "other", "total", "buckets*"]
        if base:
            headers += ["vs ZeRO-0", "expected", "meas/exp", "meas/(exp + P/N)"]
        print(f"\nworld size {world_size}")
        print(table(headers, rows))
        if args.detail:
            for stage in args.stages:
                print(f"  rank 0, ZeRO-{stage}: " + "; ".join(
                    f"{where} ({category}) {mib(nbytes)}" for nbytes, category, where in ranks[0]["detail"][stage]))
    print("\nexpected: ZeRO paper (P, G, O = ZeRO-0's params, grads, AdamW state; N = world size); "
          "exp + P/N adds the fp32 master partition DeepSpeed keeps for stages 1-3")
    print("* buckets: gradient-reduction buffers sized by DeepSpeed's reduce_bucket_size, not in the total "
          "(stages 1-2 allocate theirs at the start of each backward and free it after, so it shows 0 here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
