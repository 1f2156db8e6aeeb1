#!/usr/bin/env python
"""Cost of the non-finite step guard: a guarded training step vs the same step unguarded.

    python bench/nonfinite_guard.py                       # CPU: dwnet_tiny, batch 8, 224px, fp32 ZeRO-0
    python bench/nonfinite_guard.py --device cuda --batch 128 --precision bf16

The guard (dwnet/engine/step_guard.py) adds to every optimizer step: a copy of every buffer before
the step (BatchNorm statistics), a finiteness check of the loss and of the buffers, a multiply of
the loss, one all-reduce of three flags and one host read. Both cases run the real DeepSpeed
engine, interleaved (A, B, B, A, ...), on one rank of a gloo/nccl group of one. Reported:

  unguarded / guarded   median seconds per step, and the median of per-round ratios
  guard alone           the guard's own work (begin + loss_for_backward + end) timed in
                        isolation, as a fraction of the unguarded step: the precise figure,
                        since the whole-step ratio is within the machine's noise

Target: guard alone < 1% of the dwnet_tiny step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from common import build_engine, interleaved_times, median, print_machine, round_ratios, set_rank_env, spread

import torch  # noqa: E402

TARGET = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dwnet_tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8: CPU-sized)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median taken)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guard-iters", type=int, default=200, help="iterations timing the guard alone")
    p.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dwnet.distributed import free_port, init_distributed
    from dwnet.engine.ds_config import DTYPES
    from dwnet.engine.step_guard import StepGuard
    from dwnet.timing import seconds_per_call

    set_rank_env(0, 1, free_port(), DS_ACCELERATOR=args.device)
    init_distributed()
    print_machine(args.device)
    run_dir = tempfile.mkdtemp(prefix="bench_guard_")
    engine, num_classes = build_engine(args.model, precision=args.precision, zero_stage=args.zero_stage,
                                       batch=args.batch, image_size=args.image_size, run_dir=run_dir, world_size=1)
    device = engine.device
    dtype = DTYPES[args.precision]
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch,), device=device)
    guard = StepGuard(world_size=1, max_skips=1, window=1)  # the skip window and its verdict are not timed here
    buffers = list(engine.module.buffers())
    print(f"{args.model}, batch {args.batch}, {args.image_size}px, {args.precision}, ZeRO-{args.zero_stage}, "
          f"{device}; {len(buffers)} buffers, {sum(b.numel() * b.element_size() for b in buffers) / 1024:.0f} KiB")

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(engine(x).float(), y)

    def unguarded() -> bool:
        engine.backward(loss())
        engine.step()
        return engine.was_step_applied()

    def guarded() -> bool:
        guard.begin(engine.module)
        engine.backward(guard.loss_for_backward(loss(), last_micro_batch=True))
        engine.step()
        return not guard.end(not engine.was_step_applied(), step=0).skipped

    times = interleaved_times({"unguarded": unguarded, "guarded": guarded}, repeats=args.repeats, iters=1,
                              warmup=args.warmup, device=device)
    ratio, low, high = round_ratios(times["guarded"], times["unguarded"])

    # The guard's own work, on a loss that needs no graph: what it adds to every step.
    probe = torch.tensor(2.3, device=device, requires_grad=True)

    def guard_only() -> None:
        guard.begin(engine.module)
        guard.loss_for_backward(probe * 1.0, last_micro_batch=True)
        guard.end(True, step=0)

    guard_alone = [seconds_per_call(guard_only, device, args.guard_iters) for _ in range(args.repeats)]
    step_s = median(times["unguarded"])
    fraction = statistics.median(guard_alone) / step_s

    print(f"unguarded step  {step_s * 1e3:9.2f} ms  (spread {spread(times['unguarded']):.0%})")
    print(f"guarded step    {median(times['guarded']) * 1e3:9.2f} ms  (spread {spread(times['guarded']):.0%})")
    print(f"guarded / unguarded, median of per-round ratios: {ratio:.4f} (rounds {low:.4f} .. {high:.4f})")
    print(f"guard alone     {statistics.median(guard_alone) * 1e3:9.3f} ms = {fraction:.3%} of the unguarded step "
          f"(target < {TARGET:.0%}): {'PASS' if fraction < TARGET else 'MISS'}")
    torch.distributed.destroy_process_group()
    return 1 if args.strict and fraction >= TARGET else 0


if __name__ == "__main__":
    raise SystemExit(main())
