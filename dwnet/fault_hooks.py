"""Test hooks for the fault-tolerance tests, read from the environment by train.py (all off by
default; nothing here changes a run unless the variable is set):

- DWNET_TEST_SLOW_SAVE_S: the run's first checkpoint save sleeps this long first (a save slower
  than DWNET_PEER_TIMEOUT must not trip the peer watchdog).
- DWNET_TEST_STEP_DELAY_S: every optimizer step sleeps this long (leaves time to cut a link mid-run).
- DWNET_TEST_RANK_RECORD: a directory; each rank writes rank<R>.json with its pid, host name and
  network namespace (to show which host each rank ran on).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import time


def _delayed(fn, seconds: float, say: str = "", times: int = 0):
    """fn, sleeping `seconds` before each call (before the first `times` calls when times > 0)."""
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if not times or calls[0] <= times:
            if say:
                print(say, flush=True)
            time.sleep(seconds)
        return fn(*args, **kwargs)
    return wrapper


def apply_fault_hooks(rank: int) -> None:
    """Installs whichever hooks the environment asks for (call after init_distributed)."""
    record = os.environ.get("DWNET_TEST_RANK_RECORD")
    if record:
        os.makedirs(record, exist_ok=True)
        info = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                "netns": os.stat("/proc/self/ns/net").st_ino}
        with open(os.path.join(record, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)
    if os.environ.get("DWNET_TEST_SLOW_SAVE_S"):
        from dwnet.checkpoint import checkpointing

        seconds = float(os.environ["DWNET_TEST_SLOW_SAVE_S"])
        say = f"[rank {rank}] slow save: {seconds:g} s (test hook)"
        checkpointing.save = _delayed(checkpointing.save, seconds, say, times=1)
    if os.environ.get("DWNET_TEST_STEP_DELAY_S"):
        from dwnet.engine.trainer import Trainer

        Trainer.finish_step = _delayed(Trainer.finish_step, float(os.environ["DWNET_TEST_STEP_DELAY_S"]))
