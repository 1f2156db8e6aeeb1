"""Who am I: rank, world size, local rank and master address under any launcher, read from the
launcher's environment variables without touching the network (except the mpi4py exchange below).

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
node list and the port MASTER_PORT or 10000 + job id % 20000. DWNET_MASTER_IFACE names the
interface whose address rank 0 advertises when mpi4py discovers the master.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


class DistError(RuntimeError):
    """The launch environment is inconsistent; the message is one line naming the variable."""


@dataclass
class DistEnv:
    """One rank's view of the launch, as `discover_env` read it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int | None
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | env | openmpi | pmi | slurm | none


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
    for items in addrs.values():
        for a in items:
            if a.family == socket.AF_INET:
                ip = ipaddress.ip_address(a.address)
                if not (ip.is_loopback or ip.is_link_local):
                    return a.address
    return socket.gethostname()


def _network_stack_id() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _mpi_rendezvous(addr: str | None, port: int | None, single_host: bool) -> tuple[str, int]:
    """Rank 0 picks the master address/port; MPI_COMM_WORLD broadcasts them."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise DistError(f"MPI launch without MASTER_ADDR/MASTER_PORT needs mpi4py ({err}); "
                        "install mpi4py or pass -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=<port> to mpirun") from None
    comm = MPI.COMM_WORLD
    # a host is a name and a network stack: containers or namespaces may share the name
    hosts = comm.allgather((socket.gethostname(), _network_stack_id()))
    choice = None
    if comm.Get_rank() == 0:
        same = single_host or len(set(hosts)) == 1
        chosen_addr = addr or ("127.0.0.1" if same else _advertised_address())
        choice = (chosen_addr, port or free_port("127.0.0.1" if same else "0.0.0.0"))
    chosen_addr, chosen_port = comm.bcast(choice, root=0)
    return chosen_addr, int(chosen_port)

