"""Test worker started by every launcher in tests/test_distributed.py.

    python tests/dist_worker.py --out DIR [--mode allreduce|preflight|loop|idle] [--require PATH_TEMPLATE]

It also stands in for train.py when the launch/ recipes are tested: it accepts (and records)
`--config X --opts k=v ...`, and --out defaults to $DWNET_TEST_OUT.

allreduce: init_distributed(), all_reduce of rank+1, writes DIR/rank{R}.json.
preflight: also runs run_preflight() with required file PATH_TEMPLATE.format(rank=R); writes
           DIR/verdict{R}.json with the error before exiting non-zero.
loop:      writes DIR/ready{R}.json (with its pid), then all-reduces until --max-seconds (a safety
           net should the test die first): the test kills a rank meanwhile.
idle:      like loop but without collectives: only the launcher can end the surviving ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dwnet.distributed import all_reduce_sum, init_distributed, run_and_exit_on_failure, shutdown  # noqa: E402


def _write(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("DWNET_TEST_OUT"))
    parser.add_argument("--mode", default="allreduce", choices=("allreduce", "preflight", "loop", "idle"))
    parser.add_argument("--require", default="")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher appends it
    parser.add_argument("--config", default=None)
    parser.add_argument("--opts", nargs="*", default=[])
    args = parser.parse_args()
    if not args.out:
        parser.error("--out or $DWNET_TEST_OUT is required")

    import torch

    env = init_distributed()
    total = all_reduce_sum(torch.tensor([float(env.rank + 1)])).item()
    record = dict(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                  local_world_size=env.local_world_size, launcher=env.launcher, master_addr=env.master_addr,
                  allreduce=total, pid=os.getpid(), host=socket.gethostname(), threads=torch.get_num_threads(),
                  arg_local_rank=args.local_rank, config=args.config, opts=args.opts,
                  hostfile=os.environ.get("DWNET_HOSTFILE"), gloo_iface=os.environ.get("GLOO_SOCKET_IFNAME"))

    if args.mode == "preflight":
        from dwnet.preflight import PreflightError, run_preflight

        try:
            run_preflight([args.require.format(rank=env.rank)], [os.path.join(args.out, "ckpt")], hostfile="")
        except PreflightError as err:
            _write(os.path.join(args.out, f"verdict{env.rank}.json"), dict(rank=env.rank, error=str(err)))
            raise
        _write(os.path.join(args.out, f"verdict{env.rank}.json"), dict(rank=env.rank, error=None))
    elif args.mode in ("loop", "idle"):
        _write(os.path.join(args.out, f"ready{env.rank}.json"), record)
        tensor = torch.ones(1)
        deadline = time.monotonic() + args.max_seconds
        while time.monotonic() < deadline:
            if args.mode == "loop":
                all_reduce_sum(tensor)
                tensor.fill_(1.0)
            time.sleep(0.1)
        raise TimeoutError(f"loop mode ran {args.max_seconds:.0f} s without being killed")

    _write(os.path.join(args.out, f"rank{env.rank}.json"), record)
    shutdown()
    return 0


if __name__ == "__main__":
    run_and_exit_on_failure(main)
