"""Which network interface gloo will use, and a bounded check that it reaches the master, run on
every rank before the process group comes up.

With several NICs and no IFACE, gloo may bind to an interface the other hosts cannot reach (a
second NIC listed first, a docker bridge); its connections then retry until the process-group
timeout (30 minutes) with nothing printed. Here each rank settles the interface first (the one
GLOO_SOCKET_IFNAME names; else the one this host's name resolves to, as gloo does; else the first
interface that is up and has an IPv4 address, instead of gloo's loopback fallback, which cannot
reach another host) and checks it within DWNET_IFACE_PROBE_TIMEOUT seconds (default 10):

- a rank on the master's host: MASTER_ADDR must be an address of the chosen interface when the
  interface was picked automatically (else peers would be told an address they cannot reach);
- every other rank: a TCP connection from the chosen interface's address to MASTER_ADDR:MASTER_PORT
  must get an answer (accepted, or refused because rank 0 is not listening yet: both prove the
  path works in both directions).

A failure is one line naming the interface and telling the user to set IFACE. A rank that fails
also leaves the line in rank 0's rendezvous store (reached through ordinary routing), where a
watcher thread on rank 0 (`abort_watch`) finds it: rank 0, which may have passed its own check, then
stops too instead of waiting for the missing rank until the process-group timeout.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from dwnet.distributed.discovery import DistEnv, DistError

DEFAULT_PROBE_TIMEOUT_S = 10.0  # a working path answers in milliseconds (a refusal counts)
ABORT_KEY = "dwnet/interface_check_failed"


def _ipv4_by_interface() -> dict[str, str]:
    import psutil

    stats = psutil.net_if_stats()
    found = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and (name not in stats or stats[name].isup):
                found.setdefault(name, a.address)
    return found


def _ordered(names: dict[str, str]) -> list[str]:
    """Interface names in the kernel's order (ifindex), as `ip addr` lists them."""
    order = {name: index for index, name in socket.if_nameindex()}
    return sorted(names, key=lambda n: order.get(n, 1 << 30))


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def choose_interface() -> tuple[str, str, str]:
    """(interface, its IPv4 address, how it was chosen) for gloo on this host."""
    addrs = _ipv4_by_interface()
    wanted = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if wanted:
        if wanted not in addrs:
            raise DistError(f"GLOO_SOCKET_IFNAME={wanted} (IFACE) names no interface that is up with an IPv4 address "
                            f"on {socket.gethostname()} (there are: {', '.join(_ordered(addrs)) or 'none'}); "
                            "set IFACE to one of them (ip -br addr lists them)")
        return wanted, addrs[wanted], "GLOO_SOCKET_IFNAME"
    try:
        mine = socket.gethostbyname(socket.gethostname())
    except OSError:
        mine = ""
    for name, address in addrs.items():
        if address == mine and not _is_loopback(address):
            return name, address, f"the address of host name {socket.gethostname()}"
    for name in _ordered(addrs):
        if not _is_loopback(addrs[name]):
            return name, addrs[name], "the first interface that is up"
    raise DistError(f"no network interface other than loopback is up on {socket.gethostname()}; "
                    "a multi-host run needs one (set IFACE to it)")


def _interface_of(address: str, addrs: dict[str, str]) -> str | None:
    return next((name for name, a in addrs.items() if a == address), None)


def _route_interface(master: str) -> str | None:
    """The interface the kernel's routing table sends traffic to `master` through (a hint)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP connect: picks a route and source address, sends nothing
            return _interface_of(s.getsockname()[0], _ipv4_by_interface())
    except OSError:
        return None


def _reaches(source: str, master: str, port: int, deadline: float) -> str | None:
    """None when master:port answers a connection from `source`; else the last error."""
    last = "no answer"
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
            try:
                s.bind((source, 0))
                s.connect((master, port))
                return None
            except ConnectionRefusedError:
                return None  # a reset came back to `source`: the path works both ways
            except TimeoutError:
                last = "no answer"
            except OSError as err:
                last = os.strerror(err.errno) if err.errno else str(err)
                if err.errno in (errno.EADDRNOTAVAIL,):
                    return last
                time.sleep(0.5)
    return last


def check_interface(env: DistEnv, timeout_s: float | None = None) -> str | None:
    """Runs the check above on this rank; sets GLOO_SOCKET_IFNAME to the chosen interface so gloo
    binds where the check looked. Returns the interface (None when all ranks share loopback)."""
    if env.world_size < 2 or env.local_world_size == env.world_size:  # one host: any interface works
        return None
    try:
        master = socket.gethostbyname(env.master_addr)
    except OSError as err:
        raise DistError(f"MASTER_ADDR={env.master_addr} does not resolve on {socket.gethostname()} ({err})") from None
    if _is_loopback(master):
        return None
    if timeout_s is None:
        timeout_s = float(os.environ.get("DWNET_IFACE_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT_S))
    name, address, how = choose_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = name
    who = f"rank {env.rank} on {socket.gethostname()}"
    route = _route_interface(master)
    fix = f"set IFACE={route}" if route and route != name else "set IFACE=<the interface the hosts reach each other on>"
    fix += " for the launch (it becomes GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME; ip -br addr lists the interfaces)"
    addrs = _ipv4_by_interface()
    master_iface = _interface_of(master, addrs)
    if master_iface is not None:  # the master's own host
        if master_iface != name and how != "GLOO_SOCKET_IFNAME":
            raise DistError(f"interface check: {who}: the ranks would use interface {name} ({address}, {how}) but "
                            f"MASTER_ADDR {master} is on {master_iface}; set IFACE={master_iface} for the launch "
                            "(it becomes GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)")
        return name
    problem = _reaches(address, master, env.master_port, time.monotonic() + timeout_s)
    if problem is not None:
        line = (f"interface check: {who}: the ranks would use interface {name} ({address}, {how}), which "
                f"cannot reach MASTER_ADDR {master}:{env.master_port} within {timeout_s:g} s ({problem}); {fix}")
        _tell_master(env, line)
        raise DistError(line)
    return name


def _store_client(env: DistEnv, timeout_s: float):
    from torch.distributed import TCPStore

    # wait_for_workers=False: this connection is not counted as one of the run's ranks
    return TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s))


def _tell_master(env: DistEnv, line: str) -> None:
    """Best effort: leave the failure where rank 0's abort_watch looks (rank 0 may not be up)."""
    try:
        _store_client(env, 10).set(ABORT_KEY, line)
    except Exception:  # noqa: BLE001 - the rank fails with its own line anyway
        pass


@contextlib.contextmanager
def abort_watch(env: DistEnv, active: bool = True) -> Iterator[None]:
    """On rank 0 of a multi-host run, while the process group comes up: ends this process with the
    line another rank's failed interface check left in the store."""
    if not active or env.rank != 0 or env.world_size < 2:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        store = None
        while not done.wait(1.0):
            try:
                store = store or _store_client(env, 5)
                if store.check([ABORT_KEY]) and not done.is_set():
                    line = store.get(ABORT_KEY).decode(errors="replace")
                    print(f"[dwnet rank 0/{env.world_size} on {socket.gethostname()} (pid {os.getpid()})] FAILED: "
                          f"another rank failed: {line}", file=sys.stderr, flush=True)
                    from dwnet.distributed.failfast import exit_now

                    exit_now(1)
            except Exception:  # noqa: BLE001 - the store is not up yet: try again
                store = None

    thread = threading.Thread(target=watch, name="dwnet-interface-abort-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
