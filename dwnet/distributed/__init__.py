"""Distributed plumbing, one job per module:

- `discovery`: who am I (rank, world, local rank, master) under any launcher (`discover_env`).
- `process_group`: `init_distributed()` binds the device and brings up the process group;
  `training_device()`, `all_reduce_sum()`, `shutdown()`.
- `failfast`: `run_and_exit_on_failure()` ends a failed rank at once with a one-line message;
  `exit_now()` ends a finished one without the interpreter's teardown.

The names below are the public surface; patch a private name (`_uses_cuda`, `_bind_device`) in the
module that defines it.
"""
from dwnet.distributed.discovery import DistEnv, DistError, discover_env, expand_slurm_nodelist, free_port
from dwnet.distributed.failfast import exit_now, run_and_exit_on_failure
from dwnet.distributed.process_group import all_reduce_sum, init_distributed, shutdown, training_device

__all__ = [
    "DistEnv", "DistError", "all_reduce_sum", "discover_env", "exit_now", "expand_slurm_nodelist", "free_port",
    "init_distributed", "run_and_exit_on_failure", "shutdown", "training_device",
]
