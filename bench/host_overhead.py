#!/usr/bin/env python
"""Host work per optimizer step: operator calls and host syncs, the engine vs plain PyTorch.

    python bench/host_overhead.py                      # ZeRO 0-2 x fp32/bf16 x two depths, CPU
    python bench/host_overhead.py --stages 0 --precisions bf16
    python bench/host_overhead.py --deepspeed-step     # also DeepSpeed's own step (engine.fused_step=false)

Counted, not timed, so the figures are the same on a loaded machine. One optimizer step (after
three warm-up steps) runs under torch.profiler on the CPU:
  ops    top-level aten operator calls (an operator called inside another is not counted again);
         on a GPU each is at least one kernel launch, the host-side cost of a small-batch step
  syncs  reads of a tensor's value by the host outside any operator (.item(), bool(), int(): top-level
         `aten::item` / `aten::is_nonzero` / `aten::_local_scalar_dense`); on a GPU each one stalls
         the host until the device has caught up (a read inside an operator is that operator's
         CPU kernel reading its CPU arguments, e.g. fused AdamW's step counts, and is not one)
The model has dwnet_tiny's layout at tiny widths (embed_dim 8, 32 px, batch 2), so compute is
negligible and the count is the framework's. Cases:
  engine  `Trainer.micro_step` + `Trainer.finish_step`: the DeepSpeed engine at that ZeRO stage and
          precision with everything train.py adds (step guard, schedule), one rank; with the fused
          step (the default), and with `--deepspeed-step` also through DeepSpeed's own step
  plain   the named baseline, as timm's train.py runs the same model: fp32 weights, bf16 autocast,
          fused AdamW, `clip_grad_norm_`, `zero_grad(set_to_none=True)`
Targets: engine/plain at most 1.25 at ZeRO 0-2 (`TARGET`), and what the engine adds does not grow
with depth (depths 2-2-6-2 vs 2-2-18-2: 209 vs 401 parameter tensors).
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from collections.abc import Callable

from common import print_machine, set_rank_env, table

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

TARGET = 1.25
DEPTHS = {"2-2-6-2": (2, 2, 6, 2), "2-2-18-2": (2, 2, 18, 2)}
SYNC_OPS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense")


def tiny_dwnet(depths: tuple[int, ...]) -> nn.Module:
    from dwnet.models import DWNet

    return DWNet(embed_dim=8, depths=depths, num_classes=10)


def count_ops(step: Callable[[], object], warmup: int = 3) -> dict[str, int]:
    """{'ops': top-level aten calls, 'syncs': host reads of device values} of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = syncs = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            ops += 1
            syncs += event.name in SYNC_OPS
    return {"ops": ops, "syncs": syncs}


def batch(size: int = 2, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, image_size, image_size, generator=gen), torch.randint(0, 10, (size,), generator=gen)


def engine_step(stage: int, precision: str, depths: tuple[int, ...], run_dir: str,
                fused: bool = True) -> Callable[[], object]:
    """One optimizer step through the Trainer train.py builds (on an initialised process group);
    `fused=False`: through DeepSpeed's own step (`engine.fused_step=false`)."""
    from dwnet.config import load_config
    from dwnet.engine import Trainer

    cfg = load_config(None, [
        f"engine.zero_stage={stage}", f"engine.precision={precision}", "data.batch_size=2", "data.image_size=32",
        "model.num_classes=10", "log.tensorboard=false", "log.progress=false", f"checkpoint.dir={run_dir}",
        "checkpoint.auto_resume=false", f"engine.fused_step={str(fused).lower()}"])
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), model_factory=lambda _: tiny_dwnet(depths))
    images, targets = batch()

    def step():
        trainer.micro_step(images, targets, micro_batch=0)
        return trainer.finish_step()

    return step


def plain_step(precision: str, depths: tuple[int, ...]) -> Callable[[], object]:
    from dwnet.engine.optim import param_groups

    torch.manual_seed(0)
    model = tiny_dwnet(depths).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    images, targets = batch()

    def step():
        with autocast:
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(stages: list[int], precisions: list[str], depths: dict[str, tuple[int, ...]],
            steps: tuple[bool, ...] = (True,)) -> list[dict]:
    """One row per (depth, precision, stage, step): engine and plain counts and their ratio; `steps`
    True is the fused step, False DeepSpeed's own."""
    rows = []
    for depth_name, depth in depths.items():
        params = sum(1 for _ in tiny_dwnet(depth).parameters())
        for precision in precisions:
            plain = count_ops(plain_step(precision, depth))
            for stage, fused in ((stage, fused) for fused in steps for stage in stages):
                with tempfile.TemporaryDirectory() as run_dir:
                    engine = count_ops(engine_step(stage, precision, depth, run_dir, fused))
                rows.append({"depths": depth_name, "params": params, "precision": precision, "stage": stage,
                             "step": "fused" if fused else "DeepSpeed's",
                             "engine_ops": engine["ops"], "plain_ops": plain["ops"],
                             "added_ops": engine["ops"] - plain["ops"], "ratio": engine["ops"] / plain["ops"],
                             "engine_syncs": engine["syncs"], "plain_syncs": plain["syncs"]})
    return rows


def growth(rows: list[dict]) -> dict[tuple[str, int, str], dict[str, int]]:
    """(precision, stage, step) -> the operator calls the deeper model costs over the shallower one, through
    the engine and in plain PyTorch. The engine's overhead is flat in the number of parameter
    tensors when its growth is no more than plain PyTorch's (the model's own)."""
    by_case = collections.defaultdict(list)
    for r in sorted(rows, key=lambda r: r["params"]):
        by_case[(r["precision"], r["stage"], r["step"])].append(r)
    return {key: {"engine": case[-1]["engine_ops"] - case[0]["engine_ops"],
                  "plain": case[-1]["plain_ops"] - case[0]["plain_ops"]}
            for key, case in by_case.items() if len(case) > 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--deepspeed-step", action="store_true", help="also count DeepSpeed's own step, the baseline "
                   "the fused step replaces (engine.fused_step=false)")
    args = p.parse_args(argv)
    print_machine()
    from dwnet.distributed import free_port, init_distributed

    set_rank_env(0, 1, free_port())
    init_distributed()
    rows = measure(args.stages, args.precisions, DEPTHS, (True, False) if args.deepspeed_step else (True,))
    print(table(["depths", "param tensors", "precision", "ZeRO", "step", "engine ops", "plain ops", "engine - plain",
                 "engine / plain", f"target <= {TARGET}", "engine syncs", "plain syncs"],
                [[r["depths"], r["params"], r["precision"], r["stage"], r["step"], r["engine_ops"], r["plain_ops"],
                  r["added_ops"], f"{r['ratio']:.2f}", "PASS" if r["ratio"] <= TARGET else "MISS",
                  r["engine_syncs"], r["plain_syncs"]] for r in rows]))
    grown = growth(rows)
    if grown:
        first, last = list(DEPTHS)
        print(f"\noperator calls of depths {last} minus {first} (flat: the engine grows no more than plain PyTorch):")
        print(table(["precision", "ZeRO", "step", "engine", "plain", "flat"],
                    [[p_, s, step, g["engine"], g["plain"], "PASS" if g["engine"] <= g["plain"] else "MISS"]
                     for (p_, s, step), g in sorted(grown.items())]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
