"""Process-group plumbing: who am I (rank/world/local rank/master) under any launcher, one
`init_distributed()` for train.py, small collective helpers, and a fail-fast exit wrapper.

Launchers understood by `discover_env()`, first match wins:

| launcher | variables read |
|---|---|
| torchrun / deepspeed (pdsh, local) | RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE or LOCAL_SIZE, MASTER_ADDR, MASTER_PORT |
| OpenMPI (`mpirun`, `deepspeed --launcher openmpi`) | OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE |
| MPICH / Intel MPI (PMI) | PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS |
| Slurm (`srun`) | SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST |
| none | one process, master 127.0.0.1 on a free port |

Under MPI without MASTER_ADDR/MASTER_PORT, mpi4py (imported only then) broadcasts rank 0's
address and a free port chosen on rank 0. Under Slurm the master is the first host of the step's
node list and the port MASTER_PORT or 10000 + job id % 20000.

Environment knobs: DWNET_DIST_TIMEOUT (seconds, default 1800) bounds rendezvous and every
collective; DWNET_NUM_THREADS overrides the CPU thread count per rank; DWNET_MASTER_IFACE names
the interface whose address rank 0 advertises when mpi4py discovers the master.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dwnet.errors import debug_tracebacks

DEFAULT_TIMEOUT_S = 1800.0


class DistError(RuntimeError):
    """The launch environment is inconsistent; the message is one line naming the variable."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int | None
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | env | openmpi | pmi | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} local {self.local_rank}/{self.local_world_size} "
                f"on {socket.gethostname()} via {self.launcher}, master {self.master_addr}:{self.master_port}")


# ---- discovery ------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(str(raw).strip())
    except ValueError:
        raise DistError(f"{name}={raw!r} is not an integer; fix or unset it") from None


def _first_int(environ: Mapping[str, str], *names: str) -> tuple[str, int] | None:
    for name in names:
        if environ.get(name, "") != "":
            return name, _int(environ, name)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; tiny race until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port(name: str, port: int) -> int:
    if not 0 < port < 65536:
        raise DistError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5'] (`scontrol show
    hostnames` without scontrol; one bracket group per name, as Slurm writes them)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for value in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{value:0{len(lo)}d}{suffix}")
    return hosts


def _slurm_first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_slurm_nodelist(nodelist)[0]


def _slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """SLURM_TASKS_PER_NODE '8(x2),4' -> tasks on node `node_id` (8, 8, 4)."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _validate(env: DistEnv, names: tuple[str, str, str, str]) -> DistEnv:
    rank_n, size_n, lrank_n, lsize_n = names
    if env.world_size < 1:
        raise DistError(f"{size_n}={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise DistError(f"{rank_n}={env.rank} is outside 0..{size_n}-1={env.world_size - 1}; "
                        "the launcher's variables are inconsistent (stale values exported in the shell?)")
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise DistError(f"{lsize_n}={env.local_world_size} must be in 1..{size_n}={env.world_size}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistError(f"{lrank_n}={env.local_rank} is outside 0..{lsize_n}-1={env.local_world_size - 1}")
    if env.master_port:
        _check_port("MASTER_PORT", env.master_port)
    return env


def _master_from_env(environ: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = environ.get("MASTER_ADDR") or None
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    return addr, port


def discover_env(environ: Mapping[str, str] | None = None, *, mpi_rendezvous: bool = True) -> DistEnv:
    """Reads rank/world/local rank/master from the launcher's variables (see the module doc).

    Raises DistError (one line) on inconsistent values. `mpi_rendezvous=False` skips the mpi4py
    exchange under MPI without MASTER_ADDR/MASTER_PORT and leaves master_addr '' / master_port 0.
    """
    environ = os.environ if environ is None else environ
    addr, port = _master_from_env(environ)

    # 1. torchrun / deepspeed launcher / anything exporting the torch.distributed env:// variables
    if environ.get("RANK", "") != "" or environ.get("WORLD_SIZE", "") != "":
        missing = [n for n in ("RANK", "WORLD_SIZE") if environ.get(n, "") == ""]
        if missing:
            raise DistError(f"{missing[0]} is not set but {'RANK' if missing[0] == 'WORLD_SIZE' else 'WORLD_SIZE'}"
                            " is; set both (torch env:// convention) or neither")
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
            launcher, node = "torchrun", _first_int(environ, "GROUP_RANK")
        elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
            launcher, node = "deepspeed", _first_int(environ, "CROSS_RANK")
        else:
            launcher, node = "env", _first_int(environ, "NODE_RANK", "GROUP_RANK")
        local = _first_int(environ, "LOCAL_RANK")
        lsize = _first_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                           "MPI_LOCALNRANKS")
        if local is None and world > 1:
            raise DistError(f"RANK={rank} WORLD_SIZE={world} but LOCAL_RANK is not set; "
                            "start with torchrun/deepspeed or export LOCAL_RANK")
        if world > 1 and (addr is None or port is None):
            name = "MASTER_ADDR" if addr is None else "MASTER_PORT"
            raise DistError(f"RANK/WORLD_SIZE are set (WORLD_SIZE={world}) but {name} is not; "
                            f"export {name} on every rank (rank 0's address / a free port)")
        env = DistEnv(rank=rank, world_size=world, local_rank=local[1] if local else 0,
                      local_world_size=lsize[1] if lsize else (world if world > 1 else 1),
                      node_rank=node[1] if node else None,
                      master_addr=addr or "127.0.0.1", master_port=port or 0, launcher=launcher)
        env = _validate(env, ("RANK", "WORLD_SIZE", "LOCAL_RANK", lsize[0] if lsize else "LOCAL_WORLD_SIZE"))
        if env.master_port == 0:
            env.master_port = free_port()
        return env

    # 2./3. MPI launchers
    flavours = [
        ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                     "OMPI_COMM_WORLD_LOCAL_SIZE")),
        ("pmi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),
    ]
    for launcher, names in flavours:
        if environ.get(names[0], "") == "":
            continue
        if environ.get(names[1], "") == "":
            raise DistError(f"{names[0]} is set but {names[1]} is not; the MPI environment is incomplete")
        rank, world = _int(environ, names[0]), _int(environ, names[1])
        local = _first_int(environ, names[2])
        lsize = _first_int(environ, names[3])
        if world > 1 and local is None:
            raise DistError(f"{names[0]}={rank} but {names[2]} is not set; this MPI does not export the "
                            "local rank: export LOCAL_RANK per rank or use mpirun from OpenMPI/MPICH/Intel MPI")
        env = DistEnv(rank=rank, world_size=world, local_rank=local[1] if local else 0,
                      local_world_size=lsize[1] if lsize else (world if world > 1 else 1), node_rank=None,
                      master_addr=addr or "", master_port=port or 0, launcher=launcher)
        _validate(env, names)
        if world == 1:
            env.master_addr = env.master_addr or "127.0.0.1"
            env.master_port = env.master_port or free_port()
        elif not (addr and port) and mpi_rendezvous:
            env.master_addr, env.master_port = _mpi_rendezvous(addr, port, env.local_world_size == world)
        return env

    # 4. Slurm (srun)
    if environ.get("SLURM_PROCID", "") != "":
        rank = _int(environ, "SLURM_PROCID")
        size = _first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        if size is None:
            raise DistError("SLURM_PROCID is set but SLURM_NTASKS is not; start the ranks with srun "
                            "(see launch/slurm.sbatch)")
        world = size[1]
        local = _first_int(environ, "SLURM_LOCALID")
        node = _first_int(environ, "SLURM_NODEID")
        lsize = None
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            if environ.get(name) and node is not None:
                count = _slurm_tasks_on_node(environ[name], node[1])
                if count:
                    lsize = (name, count)
                    break
        if lsize is None:
            lsize = _first_int(environ, "SLURM_NTASKS_PER_NODE")
        if world > 1 and local is None:
            raise DistError(f"SLURM_PROCID={rank} but SLURM_LOCALID is not set; start the ranks with srun")
        if world > 1 and addr is None:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
                or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise DistError("Slurm job with SLURM_NTASKS>1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST "
                                "and no MASTER_ADDR; export MASTER_ADDR")
            addr = _slurm_first_host(nodelist)
        if port is None:
            job = _first_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
            port = 10000 + job[1] % 20000 if job and world > 1 else free_port()
        env = DistEnv(rank=rank, world_size=world, local_rank=local[1] if local else 0,
                      local_world_size=lsize[1] if lsize else (world if world > 1 else 1),
                      node_rank=node[1] if node else None, master_addr=addr or "127.0.0.1",
                      master_port=port, launcher="slurm")
        return _validate(env, ("SLURM_PROCID", size[0], "SLURM_LOCALID", lsize[0] if lsize else "SLURM_NTASKS_PER_NODE"))

    # 5. no launcher
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   master_addr=addr or "127.0.0.1", master_port=port or free_port(), launcher="none")


def _advertised_address() -> str:
    """An address of this host that other hosts can reach (for rank 0 under MPI)."""
    import psutil  # deepspeed dependency

    iface = os.environ.get("DWNET_MASTER_IFACE") or os.environ.get("GLOO_SOCKET_IFNAME") \
        or os.environ.get("NCCL_SOCKET_IFNAME")
    addrs = psutil.net_if_addrs()
    if iface:
        for name in iface.split(","):
            name = name.strip().lstrip("=^")
            for a in addrs.get(name, []):
                if a.family == socket.AF_INET:
                    return a.address
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except OSError:
        pass
    for name, items in addrs.items():
        for a in items:
            if a.family == socket.AF_INET:
                ip = ipaddress.ip_address(a.address)
                if not (ip.is_loopback or ip.is_link_local):
                    return a.address
    return socket.gethostname()


def _mpi_rendezvous(addr: str | None, port: int | None, single_host: bool) -> tuple[str, int]:
    """Rank 0 picks the master address/port; MPI_COMM_WORLD broadcasts them."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise DistError(f"MPI launch without MASTER_ADDR/MASTER_PORT needs mpi4py ({err}); "
                        "install mpi4py or pass -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=<port> to mpirun") from None
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    choice = None
    if comm.Get_rank() == 0:
        same = single_host or len(set(hosts)) == 1
        chosen_addr = addr or ("127.0.0.1" if same else _advertised_address())
        choice = (chosen_addr, port or free_port("127.0.0.1" if same else "0.0.0.0"))
    chosen_addr, chosen_port = comm.bcast(choice, root=0)
    return chosen_addr, int(chosen_port)


# ---- process group ----------------------------------------------------------------------------
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


def training_device():
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
    import torch
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

    import deepspeed

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


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: Any) -> Any:
    """In-place sum over ranks (no-op on one process); returns the tensor. On NCCL the tensor
    must live on the rank's CUDA device."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Any picklable object from `src` to every rank (returns it everywhere)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Destroys the process group (call at the end of a successful run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- failing fast -------------------------------------------------------------------------------
def _one_line_errors() -> tuple[type, ...]:
    from dwnet.errors import UserError  # ConfigError, PreflightError, DataError, ...

    errors: list[type] = [DistError, UserError]
    for module, name in (("dwnet.preflight", "PreflightError"), ("dwnet.config", "ConfigError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            errors.append(getattr(mod, name))
    return tuple(errors)


def _who() -> str:
    if _ENV is not None:
        return f"rank {_ENV.rank}/{_ENV.world_size} on {socket.gethostname()} (pid {os.getpid()})"
    r = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") \
        or os.environ.get("SLURM_PROCID") or "0"
    w = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") \
        or os.environ.get("SLURM_NTASKS") or "1"
    return f"rank {r}/{w} on {socket.gethostname()} (pid {os.getpid()})"


def run_and_exit_on_failure(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs main_fn(*args, **kwargs); on any exception logs it with this rank's identity and
    ends the process at once with os._exit(1) (130 on Ctrl-C, the code of a non-zero sys.exit):
    no atexit hooks, no process-group destructor, nothing that could block on a collective whose
    peer is gone. The launcher then sees a non-zero exit and takes the other ranks down.
    Returns main_fn's result on success."""
    try:
        return main_fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(f"[dwnet {_who()}] {exc.code}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"[dwnet {_who()}] interrupted", file=sys.stderr)
        code = 130
    except BaseException as exc:  # noqa: BLE001 - every failure must end the process
        if isinstance(exc, _one_line_errors()):
            if debug_tracebacks():
                traceback.print_exc(file=sys.stderr)
            print(f"[dwnet {_who()}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            traceback.print_exc(file=sys.stderr)
            print(f"[dwnet {_who()}] FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
