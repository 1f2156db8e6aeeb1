"""A rank for tests/test_watchdog.py: a plain gloo process group on loopback (no DeepSpeed, so it
starts fast), the peer watchdog, then all-reduces in a loop; `--slow-rank R --slow-s S` makes rank
R pause S seconds (longer than the bound, like a slow checkpoint save) while the others wait for it
inside the next all-reduce. Writes <out>/ready<R> once running and <out>/slow-done<R> after the
pause; with --steps N it stops after N all-reduces and exits like train.py does (exit_now(0))."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dwnet.distributed import DistEnv, exit_now, run_and_exit_on_failure  # noqa: E402
from dwnet.distributed.watchdog import start_peer_watchdog  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-s", type=float, default=0)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--linger-rank", type=int, default=-1,
                        help="this rank keeps running 3 bounds after the last step")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    env = DistEnv(rank, world, rank, world, 0, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "env")
    dog = start_peer_watchdog(env, run_dir=args.out)
    out = Path(args.out)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    step = 0
    while not args.steps or step < args.steps:
        if step == 3 and rank == args.slow_rank:
            time.sleep(args.slow_s)
        dist.all_reduce(torch.ones(1))
        if step == 3:
            (out / f"slow-done{rank}").write_text("")
        step += 1
        time.sleep(0.2)
    if rank == args.linger_rank:
        time.sleep(3 * dog.timeout_s)
    return 0


if __name__ == "__main__":
    exit_now(run_and_exit_on_failure(main))
