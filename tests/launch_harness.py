"""Multi-node launch on one machine, for tests: a throw-away sshd on 127.0.0.1 with its own keys,
an `ssh` wrapper that points every ssh client (DeepSpeed's ssh check, pdsh, OpenMPI's rsh agent)
at it, and process helpers that stop everything they start by pid.

    with LoopbackSSH(tmp_path / "ssh") as ssh:
        env = ssh.client_env(base_env)            # PATH starts with the wrapper's directory
        proc = Launch(["deepspeed", "--hostfile", ...], env=env, cwd=run_dir)
        rc, out = proc.wait(timeout=120)           # kills the process group on timeout
        ssh.kill_sessions()                        # anything still running under sshd, by pid

Nothing here talks to anything but 127.0.0.1; nothing is written outside the given directory
(except /run/sshd, the privilege-separation directory sshd insists on).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dwnet.distributed import free_port  # noqa: F401  (re-exported for the launch tests)

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# variables a launcher sets; a test must not inherit them from the shell that runs pytest
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "NODE_RANK", "CROSS_RANK", "CROSS_SIZE", "TORCHELASTIC_RUN_ID", "DWNET_HOSTFILE")
LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL")


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (pytest killed by a timeout
    skips fixture teardown; the child must not outlive it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def extensions_dir() -> str:
    """A torch JIT-extension cache of this virtualenv's own. DeepSpeed builds its shm comm op on
    first use; two virtualenvs sharing ~/.cache/torch_extensions/<py>_<cu> rebuild it (~1 min)
    each time the other one used it."""
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    return os.path.expanduser(f"~/.cache/torch_extensions/dwnet-tests-{tag}")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any launcher variables, venv first on PATH, CPU accelerator, loopback
    interfaces for gloo and OpenMPI, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_btl_tcp_if_include="lo", DWNET_DIST_TIMEOUT="120", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sshd_config(keys: Path, listen: str, port: int, pid_file: Path, *extra: str) -> str:
    """A throw-away sshd's config: key login as root with the test's keys in `keys`, on `listen`:`port`
    only, nothing else enabled (no PAM, passwords, forwarding, DNS)."""
    lines = [f"Port {port}", f"ListenAddress {listen}", f"HostKey {keys / 'host_ed25519'}", f"PidFile {pid_file}",
             f"AuthorizedKeysFile {keys / 'authorized_keys'}", "PermitRootLogin yes", "StrictModes no", "UsePAM no",
             "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
             "UseDNS no", "PrintMotd no", "PrintLastLog no", "X11Forwarding no", "AllowTcpForwarding no",
             "MaxStartups 64", *extra, "LogLevel ERROR"]
    return "\n".join(lines) + "\n"


def make_keys(keys: Path) -> None:
    """A host key and a client key made for the test in `keys`, the client key authorised."""
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dwnet-test-{name}",
                        "-f", str(keys / name)], check=True, stdin=subprocess.DEVNULL)
    (keys / "authorized_keys").write_text((keys / "id_ed25519.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)


def ssh_client(keys: Path, port: int, bin_dir: Path, why: str, *extra: str) -> Path:
    """An ssh client config for the test's key on `port` (no host-key prompts, batch mode), and an
    `ssh` wrapper in `bin_dir` that uses it (put `bin_dir` first on PATH); returns the config."""
    config = keys / "ssh_config"
    lines = ["Host *", f"Port {port}", "User root", "AddressFamily inet", f"IdentityFile {keys / 'id_ed25519'}",
             "IdentitiesOnly yes", "StrictHostKeyChecking no", "UserKnownHostsFile /dev/null",
             "GlobalKnownHostsFile /dev/null", "BatchMode yes", "ConnectTimeout 10", *extra, "LogLevel ERROR"]
    config.write_text("\n  ".join(lines) + "\n")
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\n# test-only: {why}\nexec {SSH} -F {config} "$@"\n')
    wrapper.chmod(0o755)
    return config


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Launch:
    """A launcher command in its own session (process group); output goes to a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | os.PathLike, log: str | os.PathLike):
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=str(cwd), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.pgid = self.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """(exit code, output); None and a killed process group when `timeout` passes."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.stop()
        return rc, self.output()

    def stop(self) -> None:
        """SIGKILL what is left: the group (our pgid) and every descendant, by pid."""
        left = descendants(self.pid)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        kill_pids(left)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()


class LoopbackSSH:
    """sshd -D on 127.0.0.1:<free port> with a generated host key and client key."""

    def __init__(self, workdir: str | os.PathLike):
        self.dir = Path(workdir)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.bin_dir = self.dir / "bin"
        self.config = self.dir / "ssh_config"

    # -- setup --
    def _write_configs(self) -> None:
        d = self.dir
        (d / "sshd_config").write_text(sshd_config(d, "127.0.0.1", self.port, d / "sshd.pid"))
        self.config = ssh_client(d, self.port, self.bin_dir, "every ssh goes to the loopback sshd")

    def start(self, attempts: int = 3) -> LoopbackSSH:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        make_keys(self.dir)
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            self._write_configs()
            log = open(self.dir / "sshd.log", "w")
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
            log.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                probe = subprocess.run([str(self.bin_dir / "ssh"), "127.0.0.1", "true"], capture_output=True,
                                       timeout=20, stdin=subprocess.DEVNULL)
                if probe.returncode == 0:
                    return self
                last = probe.stderr.decode(errors="replace")
                time.sleep(0.2)
            self.stop()
            last += (self.dir / "sshd.log").read_text(errors="replace")
        raise RuntimeError(f"loopback sshd did not come up: {last.strip()[-2000:]}")

    # -- use --
    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """env with the ssh wrapper first on PATH and pdsh set to ssh."""
        env = dict(env)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["PDSH_RCMD_TYPE"] = "ssh"
        return env

    def session_pids(self) -> list[int]:
        """Everything running under this sshd (ssh sessions and what they started)."""
        return descendants(self.proc.pid) if self.proc else []

    def kill_sessions(self) -> None:
        kill_pids(self.session_pids())

    # -- teardown --
    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill_sessions()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def __enter__(self) -> LoopbackSSH:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
