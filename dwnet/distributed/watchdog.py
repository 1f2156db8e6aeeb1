"""Peer watchdog: every rank of a multi-rank run ends within DWNET_PEER_TIMEOUT seconds (default
90) of another rank's host dying or becoming unreachable, instead of waiting in a collective for
the process-group timeout (DWNET_DIST_TIMEOUT, 30 minutes).

A daemon thread per rank exchanges small UDP datagrams with rank 0 (its own socket, not a
collective): every other rank pings rank 0 each `interval`, rank 0 answers each ping. The thread
runs while the main thread is inside a long checkpoint save, an evaluation, a universal-checkpoint
conversion or a first step that compiles kernels (those release the GIL or switch threads), so a
slow rank is never mistaken for a lost one: only silence of the peer process or the network is.

On silence longer than the bound the thread prints one line naming the rank and host that stopped
answering, appends it to <run dir>/train.log and ends this process (exit code 1): the launcher sees
a failed rank and tears the rest down. Rank 0 also passes the verdict on in its answers, so the
other ranks stop at once rather than one bound later.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from dwnet.distributed.discovery import DistEnv, DistError

DEFAULT_PEER_TIMEOUT_S = 90.0  # + the launcher's ssh keepalive (launch/): everything ends within 2 minutes
EXIT_CODE = 1

_ACTIVE: PeerWatchdog | None = None


def peer_timeout_s(environ: dict[str, str] | None = None) -> float:
    """DWNET_PEER_TIMEOUT in seconds (0 disables the watchdog); a bad value is a one-line error."""
    raw = (os.environ if environ is None else environ).get("DWNET_PEER_TIMEOUT", "")
    if raw.strip() == "":
        return DEFAULT_PEER_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value == 0 or 2 <= value < 1e6):
        raise DistError(f"DWNET_PEER_TIMEOUT={raw!r} is not a number of seconds >= 2; "
                        f"set e.g. DWNET_PEER_TIMEOUT={int(DEFAULT_PEER_TIMEOUT_S)} (0 disables the peer watchdog)")
    return value


def _stamp(rank: int) -> str:
    return f"{time.strftime('%H:%M:%S')} [rank {rank}]"


class PeerWatchdog:
    """One rank's heartbeat thread (see the module docstring)."""

    def __init__(self, env: DistEnv, port: int, timeout_s: float, run_dir: str | None, sock: socket.socket):
        self.env = env
        self.rank = env.rank
        self.port = port
        self.timeout_s = timeout_s
        self.interval = max(0.2, min(2.0, timeout_s / 10))
        self.run_dir = run_dir
        self.sock = sock
        self.sock.settimeout(self.interval)
        self.host = socket.gethostname()
        now = time.monotonic()
        # rank 0: when each peer was last heard and from where; others: when rank 0 last answered
        self.last_seen: dict[int, float] = {r: now for r in range(1, env.world_size)} if self.rank == 0 else {0: now}
        self.where: dict[int, str] = {}
        self.addrs: dict[int, tuple[str, int]] = {}  # rank 0: where each peer's pings come from
        self.done: set[int] = set()  # peers that said goodbye after finishing
        self.verdict: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dwnet-peer-watchdog", daemon=True)

    # -- the thread --
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.rank == 0:
                    self._serve_once()
                else:
                    self._ping_once()
                self._check()
            except Exception as err:  # noqa: BLE001 - the watchdog must never take a healthy run down
                print(f"{_stamp(self.rank)} peer watchdog: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                time.sleep(self.interval)

    def _serve_once(self) -> None:
        try:
            data, addr = self.sock.recvfrom(4096)
        except (TimeoutError, BlockingIOError):
            return
        except OSError:  # e.g. the link is down: silence, judged by _check
            time.sleep(self.interval)
            return
        msg = json.loads(data)
        peer = int(msg["rank"])
        self.last_seen[peer] = time.monotonic()
        self.where[peer] = f"{msg.get('host', '?')} ({addr[0]})"
        self.addrs[peer] = addr
        if msg.get("bye"):
            self.done.add(peer)
            return
        self._send({"lost": self.verdict}, addr)

    def _ping_once(self) -> None:
        self._send({"rank": self.rank, "host": self.host}, (self.env.master_addr, self.port))
        deadline = time.monotonic() + self.interval
        while time.monotonic() < deadline:
            try:
                data, _ = self.sock.recvfrom(4096)
            except (TimeoutError, BlockingIOError):
                return
            except OSError:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return
            msg = json.loads(data)
            self.last_seen[0] = time.monotonic()
            if msg.get("bye"):
                self.done.add(0)
                return
            if msg.get("lost"):
                self._give_up(f"rank 0 reports: {msg['lost']}", to_log=False)

    def _send(self, msg: dict, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(json.dumps(msg).encode(), addr)
        except OSError:  # unreachable right now: the silence is judged by _check
            pass

    def _check(self) -> None:
        now = time.monotonic()
        for peer, seen in sorted(self.last_seen.items()):
            if peer in self.done or now - seen <= self.timeout_s:
                continue
            where = self.where.get(peer) or (f"{self.env.master_addr}" if peer == 0 else "its host")
            self.verdict = (f"rank {peer} on {where} stopped answering for {now - seen:.0f} s "
                            f"(DWNET_PEER_TIMEOUT={self.timeout_s:g})")
            if self.rank == 0:  # let the others hear it before this process ends
                for other, addr in self.addrs.items():
                    if other != peer:
                        self._send({"lost": self.verdict}, addr)
            self._give_up(self.verdict, to_log=self.rank == 0 or peer == 0)

    def _give_up(self, what: str, to_log: bool) -> None:
        line = (f"[dwnet rank {self.rank}/{self.env.world_size} on {self.host} (pid {os.getpid()})] PEER LOST: {what}; "
                "stopping this rank; relaunch the same command to resume from the newest complete checkpoint")
        if to_log and self.run_dir:  # first: the console may lead over the cut link
            try:
                with open(os.path.join(self.run_dir, "train.log"), "a") as f:
                    f.write(f"{_stamp(self.rank)} {line}\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                pass

        def say() -> None:  # may block for good when stderr is a pipe into a cut ssh session
            os.write(2, (line + "\n").encode())
            sys.stdout.flush()
            sys.stderr.flush()

        speaker = threading.Thread(target=say, daemon=True)
        speaker.start()
        speaker.join(timeout=3)
        os._exit(EXIT_CODE)  # no teardown: it would wait on the lost peer

    # -- control --
    def start(self) -> PeerWatchdog:
        self.thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """Stops the thread; a finished rank says goodbye so its peers do not take its exit for a loss."""
        self._stop.set()
        if finished:
            bye = {"rank": self.rank, "host": self.host, "bye": True}
            targets = [(self.env.master_addr, self.port)] if self.rank != 0 else list(self.addrs.values())
            for _ in range(3):  # datagrams may be dropped; a lost goodbye would read as a lost peer
                for addr in targets:
                    self._send(bye, addr)


def start_peer_watchdog(env: DistEnv, run_dir: str | None = None,
                        timeout_s: float | None = None) -> PeerWatchdog | None:
    """Collective (every rank, right after init_distributed): rank 0 opens the UDP socket and
    broadcasts its port; every rank starts its thread. None for one rank or DWNET_PEER_TIMEOUT=0."""
    global _ACTIVE
    import torch.distributed as dist

    timeout_s = peer_timeout_s() if timeout_s is None else timeout_s
    if env.world_size < 2 or timeout_s == 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if env.rank == 0:
        sock.bind(("0.0.0.0", 0))
    box = [sock.getsockname()[1] if env.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _ACTIVE = PeerWatchdog(env, int(box[0]), timeout_s, run_dir, sock).start()
    return _ACTIVE


def stop_peer_watchdog(finished: bool = True) -> None:
    """Called by exit_now: a rank that ends cleanly says goodbye."""
    if _ACTIVE is not None:
        _ACTIVE.stop(finished)
