"""The process group: `init_distributed()` exports the discovered launch, binds this rank's device
(CUDA device or CPU thread count) and brings up DeepSpeed's torch.distributed group; plus the
device query, one collective and the teardown that the rest of the code needs.

Environment knobs: DWNET_DIST_TIMEOUT (seconds, default 1800) bounds rendezvous and every
collective; DWNET_IFACE_PROBE_TIMEOUT (default 10) bounds the interface check (interface_probe);
DWNET_NUM_THREADS overrides the CPU thread count per rank.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any

from dwnet.distributed.discovery import DistEnv, DistError, discover_env
from dwnet.distributed.interface_probe import abort_watch, check_interface

if TYPE_CHECKING:
    import torch

DEFAULT_TIMEOUT_S = 1800.0

_ENV: DistEnv | None = None


def _uses_cuda() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name() == "cuda"
    except Exception:  # deepspeed missing or misconfigured accelerator: fall back to torch's view
        return True


def training_device() -> torch.device:
    """The device this rank computes on: the CUDA device `init_distributed` bound (which is not
    always cuda:LOCAL_RANK: a launcher may give each rank one visible GPU), or the CPU when DeepSpeed
    runs on its CPU accelerator."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if _uses_cuda() else torch.device("cpu")


def _loopback_iface() -> str | None:
    try:
        import psutil

        for name, items in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in items):
                return name
    except Exception:
        pass
    return None


def _bind_device(env: DistEnv, cuda: bool) -> None:
    import torch

    if cuda:
        count = torch.cuda.device_count()
        if env.local_rank < count:
            device = env.local_rank
        elif count == 1:  # the launcher gave each rank its own GPU (srun --gpus-per-task=1, --gpu-bind)
            device = 0
        else:
            raise DistError(f"LOCAL_RANK={env.local_rank} on {socket.gethostname()} but only {count} CUDA "
                            f"device(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r});"
                            " launch at most one rank per GPU")
        torch.cuda.set_device(device)
        return
    if os.environ.get("DWNET_NUM_THREADS"):
        threads = int(os.environ["DWNET_NUM_THREADS"])
    else:
        try:
            avail = len(os.sched_getaffinity(0))
        except AttributeError:
            avail = os.cpu_count() or 1
        # a launcher that pinned this rank to a core subset (deepspeed --bind_cores_to_rank,
        # srun --cpu-bind, mpirun --bind-to) already split the cores: use them all
        threads = avail if avail < (os.cpu_count() or avail) else avail // env.local_world_size
    torch.set_num_threads(max(1, threads))


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> DistEnv:
    """Discovers the launch, exports RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/
    MASTER_PORT, binds the device and initialises DeepSpeed's (torch.distributed) process group,
    also for one process (DeepSpeed needs a group). Idempotent.

    timeout_s bounds the rendezvous and every collective: DWNET_DIST_TIMEOUT, else 1800 s.
    backend defaults to nccl on CUDA, gloo on CPU.
    """
    global _ENV
    import torch.distributed as dist

    if timeout_s is None:
        timeout_s = float(os.environ.get("DWNET_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    env = discover_env()
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise DistError(f"a process group of rank {dist.get_rank()}/{dist.get_world_size()} already exists "
                            f"but the launcher says rank {env.rank}/{env.world_size}")
        _ENV = env
        return env
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size), "LOCAL_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
    })
    cuda = _uses_cuda()
    backend = backend or ("nccl" if cuda else "gloo")
    _bind_device(env, cuda)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        try:
            loopback_master = ipaddress.ip_address(socket.gethostbyname(env.master_addr)).is_loopback
        except (OSError, ValueError):
            loopback_master = False
        iface = _loopback_iface() if loopback_master or env.world_size == 1 else None
        if iface:  # every rank is on this host: keep gloo's pairs on loopback
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    # several hosts: settle the interface and check it reaches the master before gloo would hang on it
    checked = check_interface(env)

    import deepspeed

    # a rank whose interface check failed must not leave rank 0 waiting in the rendezvous
    with abort_watch(env, active=checked is not None):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise DistError(f"process group came up as rank {dist.get_rank()}/{dist.get_world_size()}, "
                        f"the launcher said {env.rank}/{env.world_size}")
    if not cuda:
        _unlink_shm_allreduce_buffer(env)
    _ENV = env
    return env


def shm_allreduce_buffer_path(env: DistEnv) -> str:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps this rank's ~70 MB workspace."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"


def _unlink_shm_allreduce_buffer(env: DistEnv) -> None:
    """DeepSpeed's CPU backend creates one shared-memory workspace per rank when all ranks share a
    host and never unlinks it: every run, and every killed run, would leave ~70 MB per rank in
    /dev/shm (RAM) until reboot. Once every rank has mapped its peers' workspaces (the barrier),
    the names can go: the mappings live on until the processes exit, however they exit."""
    import torch.distributed as dist

    if env.world_size > 1:
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_allreduce_buffer_path(env))


def get_env() -> DistEnv | None:
    """The DistEnv of the last init_distributed() in this process (None before)."""
    return _ENV


def all_reduce_sum(tensor: Any) -> Any:
    """In-place sum over ranks (no-op on one process); returns the tensor. On NCCL the tensor
    must live on the rank's CUDA device."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    """Destroys the process group (call at the end of a successful run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

