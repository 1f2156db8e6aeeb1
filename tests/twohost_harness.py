"""Two hosts on one machine, for tests: two network namespaces (each its own network stack), joined
by a veth pair whose ends are both named `eth1` (10.77.N.1/24 on host a, 10.77.N.2/24 on host b,
N random per run), each with loopback up, optionally an `eth0` listed first (a veth to nowhere) that cannot reach
the other host (10.78.N.x/24), and a throw-away sshd per host listening on its eth1 address with a
host key and client key made for the test. The filesystem is shared, like NFS.

    with TwoHosts(tmp_path / "hosts", wrong_first_iface=True) as hosts:
        hosts.hostfile(path)                          # "10.77.N.1 slots=1\\n10.77.N.2 slots=1"
        proc = hosts.launch("a", ["bash", "launch/deepspeed.sh"], env=hosts.client_env(env), ...)
        hosts.link("b", up=False)                     # partition host b
        hosts.pids("b")                               # every process inside host b's namespace

Traffic goes only between the two namespaces and over their loopbacks. Everything created is
removed and every process stopped by pid in stop() (also on failure: use it as a context manager
or pytest finalizer).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from launch_harness import SSHD, Launch, _die_with_parent, kill_pids, make_keys, ssh_client, sshd_config

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)


def namespaces_unavailable() -> str | None:
    """None when this process may create network namespaces; else the one-line reason."""
    if shutil.which("ip") is None:
        return "two-host tests need iproute2 (`ip`)"
    name = f"dwnet-probe-{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", name, check=False)
    except OSError as err:
        return f"cannot run ip netns ({err})"
    if made.returncode != 0:
        return f"cannot create network namespaces here (ip netns add: {made.stderr.strip() or 'failed'}; needs root)"
    _ip("netns", "del", name, check=False)
    return None


class TwoHosts:
    def __init__(self, workdir: str | os.PathLike, wrong_first_iface: bool = False):
        self.dir = Path(workdir)
        self.tag = secrets.token_hex(3)
        self.subnet = secrets.randbelow(250) + 2
        self.ns = {"a": f"dwnet-{self.tag}-a", "b": f"dwnet-{self.tag}-b"}
        self.addr = {"a": f"10.77.{self.subnet}.1", "b": f"10.77.{self.subnet}.2"}
        self.wrong_first_iface = wrong_first_iface
        self.sshd: dict[str, subprocess.Popen] = {}
        self.launches: list[Launch] = []
        self.bin_dir = self.dir / "bin"
        self.created: list[str] = []

    # -- network --
    def _network(self) -> None:
        for host, ns in self.ns.items():
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.wrong_first_iface:  # made before eth1 arrives, so it is listed (and picked) first
                # a veth whose other end stays in this namespace without an address: up, with
                # carrier, and leading nowhere (no `dummy` module in every CI kernel)
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-nowhere")
                _ip("-n", ns, "addr", "add", f"10.78.{self.subnet}.{1 if host == 'a' else 2}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0-nowhere", "up")
                _ip("-n", ns, "link", "set", "eth0", "up")
        va, vb = f"dw{self.tag}a", f"dw{self.tag}b"
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for host, dev in (("a", va), ("b", vb)):
            ns = self.ns[host]
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "link", "set", dev, "name", "eth1")
            _ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth1")
            _ip("-n", ns, "link", "set", "eth1", "up")

    def link(self, host: str, up: bool) -> None:
        """Takes host's eth1 down (a partition: both hosts alive, neither reaches the other) or up."""
        _ip("-n", self.ns[host], "link", "set", "eth1", "up" if up else "down")

    def interfaces(self, host: str) -> list[str]:
        out = _ip("-n", self.ns[host], "-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    # -- ssh --
    def _ssh(self) -> None:
        d = self.dir
        make_keys(d)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # ServerAlive: a client whose server went silent (cut link) gives up in ~15 s, so pdsh and
        # mpirun see that host's session end instead of waiting for TCP's own timeout (minutes)
        ssh_client(d, 22, self.bin_dir, "ssh with the two-host test key", "ServerAliveInterval 5",
                   "ServerAliveCountMax 3")
        for host, ns in self.ns.items():
            config = d / f"sshd_{host}.conf"
            # the host end of a cut link gives up on its sessions too
            config.write_text(sshd_config(d, self.addr[host], 22, d / f"sshd_{host}.pid",
                                          "ClientAliveInterval 5", "ClientAliveCountMax 3"))
            log = open(d / f"sshd_{host}.log", "w")
            # `ip netns exec` execs sshd: the pid is sshd's own
            self.sshd[host] = subprocess.Popen([IP, "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(config)],
                                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True, preexec_fn=_die_with_parent)
            log.close()
        deadline = time.monotonic() + 30
        for host in self.ns:
            while True:
                probe = subprocess.run([IP, "netns", "exec", self.ns["a"], str(self.bin_dir / "ssh"), self.addr[host], "true"],
                                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on host {host} did not come up: {probe.stderr.strip()} "
                                       f"{(d / f'sshd_{host}.log').read_text()}")
                time.sleep(0.3)

    # -- use --
    def hostfile(self, path: str | os.PathLike, slots: int = 1) -> Path:
        path = Path(path)
        path.write_text("".join(f"{self.addr[h]} slots={slots}\n" for h in ("a", "b")))
        return path

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        env = dict(env)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["PDSH_RCMD_TYPE"] = "ssh"
        return env

    def launch(self, host: str, cmd: list, env: dict[str, str], cwd: str | os.PathLike,
               log: str | os.PathLike) -> Launch:
        """Runs cmd inside host's namespace (the launching node), in its own process group."""
        proc = Launch([IP, "netns", "exec", self.ns[host], *cmd], env=env, cwd=cwd, log=log)
        self.launches.append(proc)
        return proc

    def pids(self, host: str) -> list[int]:
        """Every process in host's network namespace (ranks, launchers, sshd and its sessions)."""
        out = _ip("netns", "pids", self.ns[host], check=False).stdout
        return [int(p) for p in out.split()]

    def netns_inode(self, host: str) -> int:
        return os.stat(f"/run/netns/{self.ns[host]}").st_ino

    def kill_host(self, host: str, but: tuple[int, ...] = ()) -> list[int]:
        """SIGKILL every process on `host` except sshd itself and `but` (a whole node dying)."""
        keep = {self.sshd[host].pid, *but}
        victims = [p for p in self.pids(host) if p not in keep]
        kill_pids(victims)
        return victims

    # -- lifecycle --
    def start(self) -> TwoHosts:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._ssh()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.launches:
            proc.stop()
        for _ in range(3):  # anything left in either namespace, by pid, sshd last
            left = [p for ns in self.ns for p in self.pids(ns) if p not in {s.pid for s in self.sshd.values()}]
            kill_pids(left)
            if not left:
                break
            time.sleep(0.2)
        for proc in self.sshd.values():
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        kill_pids([p for ns in self.ns for p in self.pids(ns)])
        for ns in self.created:  # the veth pair goes with its namespaces
            _ip("netns", "del", ns, check=False)
        self.created = []
        _ip("link", "del", f"dw{self.tag}a", check=False)  # only if moving it failed half-way

    def __enter__(self) -> TwoHosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
