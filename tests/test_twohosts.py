"""Two real network stacks (tests/twohost_harness.py): launch/deepspeed.sh (pdsh), launch/openmpi.sh
and launch/mpirun.sh with one rank per host over eth1; a partition mid-run, a host dying, and the
wrong interface picked without IFACE. Every host also has an `eth0`, listed first, that leads
nowhere: each IFACE=eth1 launch is also the "same launch with IFACE set trains" half of the
wrong-interface case.

Traffic only between the two namespaces made here; everything is removed and every process
stopped by pid when the module ends, failed or not."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch_harness import REPO, alive, clean_env, free_port  # noqa: E402
from twohost_harness import TwoHosts, namespaces_unavailable  # noqa: E402

pytestmark = pytest.mark.slow

BOUND = 15  # DWNET_PEER_TIMEOUT in these tests (the default is 90)
EXIT_WITHIN = BOUND + 45  # ranks: the bound + a ping interval; launchers: + ssh keepalive (3 x 5 s) + teardown
STEPS = 15  # 3 epochs x 5 steps (160 digits, 2 ranks x 16)
VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    with TwoHosts(tmp_path_factory.mktemp("hosts"), wrong_first_iface=True) as two:
        assert two.interfaces("a").index("eth0") < two.interfaces("a").index("eth1")  # eth0 listed first
        yield two
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in two.ns.values()), listed  # nothing left behind
    assert not any(alive(p.pid) for p in two.sshd.values())


def _tree(run: Path) -> Path:
    """run/repo: launch/ and ds_configs/ as in the repository, a train.py that runs the real one,
    and a .deepspeed_env (the remote shells' environment; pdsh forwards PYTHON* by itself)."""
    repo = run / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in (REPO / "launch").iterdir():
        (repo / "launch" / script.name).write_bytes(script.read_bytes())
        (repo / "launch" / script.name).chmod(0o755)
    (repo / "ds_configs").symlink_to(REPO / "ds_configs")
    (repo / "train.py").write_text(f"import runpy\nrunpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n")
    return repo


def _env(run: Path, hosts: TwoHosts, **extra: str) -> dict[str, str]:
    env = clean_env(VENV=str(VENV), CONFIG="ds_configs/demo_cpu.yaml", MASTER_PORT=str(free_port()),
                    HOSTFILE=str(hosts.hostfile(run / "hostfile")), TMPDIR=str(run), DWNET_PEER_TIMEOUT=str(BOUND),
                    DWNET_TEST_RANK_RECORD=str(run / "ranks"), SSH_ALIVE_S="5", **extra)
    for loopback_only in ("GLOO_SOCKET_IFNAME", "OMPI_MCA_oob_tcp_if_include", "OMPI_MCA_btl_tcp_if_include"):
        env.pop(loopback_only, None)
    return hosts.client_env(env)


def _forward(run: Path, env: dict[str, str]) -> dict[str, str]:
    """What the remote ranks need from `env`: a .deepspeed_env for pdsh, -x options for mpirun."""
    forwarded = {k: env[k] for k in env if k.startswith(("DWNET_", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"))}
    (run / "repo" / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in forwarded.items()))
    return dict(env, MPI_EXTRA="--allow-run-as-root " + " ".join(f"-x {k}" for k in forwarded) + " -x PYTHONPATH")


def _opts(run: Path, betons: Path, epochs: int = STEPS // 5) -> list[str]:
    return ["--opts", f"data.train_path={betons / 'train.beton'}", f"data.val_path={betons / 'val.beton'}",
            "data.batch_size=16", f"optim.epochs={epochs}", "optim.warmup_epochs=0", "checkpoint.every_steps=0",
            f"checkpoint.dir={run / 'run'}", "log.progress=false", "data.num_workers=1"]


def _launch(hosts: TwoHosts, run: Path, script: str, env: dict, betons: Path, name: str = "launch", **kw):
    repo = run / "repo"
    env = _forward(run, env)
    return hosts.launch("a", ["bash", repo / "launch" / script, *_opts(run, betons, **kw)], env=env, cwd=repo,
                        log=run / f"{name}.log")


def _root(run: Path) -> str:
    from dwnet.checkpoint.layout import checkpoint_root

    return checkpoint_root(str(run / "run"))


def _complete(run: Path) -> list[str]:
    from dwnet.checkpoint.layout import complete_tags

    root = _root(run)
    return complete_tags(root) if os.path.isdir(root) else []


def _ranks_on_their_hosts(run: Path, hosts: TwoHosts, n: int = 2) -> list[dict]:
    records = sorted((json.loads(p.read_text()) for p in (run / "ranks").glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == list(range(n))
    assert [r["netns"] for r in records] == [hosts.netns_inode(h) for h in "ab"[:n]]  # rank 0 on a, rank 1 on b
    return records


def _wait_for_tag(proc, run: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not _complete(run):
        assert proc.proc.poll() is None, f"run ended before its first checkpoint:\n{proc.output()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint in time:\n{proc.output()[-4000:]}"
        time.sleep(0.5)
    return _complete(run)[-1]


def _wait_gone(pids: list[int], deadline: float) -> list[int]:
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    return [p for p in pids if alive(p)]


def _verify_tags(run: Path) -> None:
    from dwnet.checkpoint.checkpointing import verify_tag

    for tag in _complete(run):
        assert verify_tag(_root(run), tag) is None, tag


def _peer_lost_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "PEER LOST" in line]


@pytest.mark.parametrize("script", ["openmpi.sh", "mpirun.sh"])
def test_mpi_launch_trains_one_rank_per_host(tmp_path, hosts, digits_betons, script):
    _tree(tmp_path)
    env = _env(tmp_path, hosts, IFACE="eth1")
    if script == "openmpi.sh":
        env.pop("MASTER_PORT")  # rank 0 picks its address on IFACE and a port (mpi4py)
    proc = _launch(hosts, tmp_path, script, env, digits_betons, epochs=1)
    rc, log = proc.wait(timeout=400)
    assert rc == 0, log[-4000:]
    _ranks_on_their_hosts(tmp_path, hosts)
    assert _complete(tmp_path) == ["step_00000005"]
    assert "world_size: 2\n" in (tmp_path / "run" / "train.log").read_text()


def test_partition_stops_every_rank_and_the_relaunch_resumes(tmp_path, hosts, digits_betons):
    """deepspeed.sh (pdsh) with IFACE=eth1: host b's link goes down after the first checkpoint.
    Rank 0, rank 1 and the launcher end within the bound with one line each; no complete tag is
    damaged; with the link back the same command resumes and ends at the uninterrupted step count,
    through a save slower than the bound."""
    _tree(tmp_path)
    env = _env(tmp_path, hosts, IFACE="eth1", DWNET_TEST_STEP_DELAY_S="1")
    proc = _launch(hosts, tmp_path, "deepspeed.sh", env, digits_betons)
    first = _wait_for_tag(proc, tmp_path)
    records = _ranks_on_their_hosts(tmp_path, hosts)
    assert "pdsh" in proc.output()
    hosts.link("b", up=False)
    cut = time.monotonic()
    rc, log = proc.wait(timeout=EXIT_WITHIN + 60)
    launcher_took = time.monotonic() - cut
    left = _wait_gone([r["pid"] for r in records], cut + EXIT_WITHIN)
    ranks_took = time.monotonic() - cut
    assert rc not in (0, None), log[-4000:]
    assert launcher_took < EXIT_WITHIN and not left, (launcher_took, left, log[-4000:])
    lines = _peer_lost_lines(log)  # rank 1's own line cannot cross the cut link: it is in train.log
    assert len(lines) == 1 and "rank 1 on " in lines[0] and f"({hosts.addr['b']}) stopped answering" in lines[0]
    assert "relaunch the same command to resume" in lines[0]
    train_log = _peer_lost_lines((tmp_path / "run" / "train.log").read_text())
    assert any(lines[0].split("] ", 1)[1] in line for line in train_log)  # rank 0's line
    assert any(f"rank 0 on {hosts.addr['a']} stopped answering" in line for line in train_log)  # rank 1's view
    _verify_tags(tmp_path)
    (tmp_path / "probe_partition.txt").write_text(f"launcher {launcher_took:.1f} s, ranks {ranks_took:.1f} s\n"
                                                  + "\n".join(lines))
    print(f"partition: launcher exited after {launcher_took:.1f} s, ranks gone after {ranks_took:.1f} s; {lines[0]}")

    hosts.link("b", up=True)
    resumed_from = _complete(tmp_path)[-1]
    assert resumed_from >= first
    env["DWNET_TEST_SLOW_SAVE_S"] = str(BOUND + 5)  # a save longer than the bound must not end the run
    env.pop("DWNET_TEST_STEP_DELAY_S")
    proc = _launch(hosts, tmp_path, "deepspeed.sh", env, digits_betons, name="relaunch")
    rc, log = proc.wait(timeout=600)
    assert rc == 0, log[-4000:]
    assert not _peer_lost_lines(log)
    assert log.count(f"slow save: {BOUND + 5:g} s") == 2, log[-4000:]  # each rank's first save
    assert f"resumed from {resumed_from}" in log, log[-4000:]
    assert _complete(tmp_path)[-1] == f"step_{STEPS:08d}"
    _verify_tags(tmp_path)


def test_dead_host_stops_the_other_and_one_rank_finishes(tmp_path, hosts, digits_betons):
    """Host b dies (its link goes silent, every process on it SIGKILLed: no FIN, no RST reach
    host a). Rank 0 and the launcher end within the bound with the same kind of line; relaunched
    on host a alone (one rank) the run continues through the elastic resume and finishes."""
    _tree(tmp_path)
    env = _env(tmp_path, hosts, IFACE="eth1", DWNET_TEST_STEP_DELAY_S="1")
    proc = _launch(hosts, tmp_path, "deepspeed.sh", env, digits_betons)
    _wait_for_tag(proc, tmp_path)
    records = _ranks_on_their_hosts(tmp_path, hosts)
    hosts.link("b", up=False)
    killed = hosts.kill_host("b")
    died = time.monotonic()
    assert records[1]["pid"] in killed
    rc, log = proc.wait(timeout=EXIT_WITHIN + 60)
    took = time.monotonic() - died
    assert rc not in (0, None) and took < EXIT_WITHIN, (took, log[-4000:])
    assert not _wait_gone([records[0]["pid"]], died + EXIT_WITHIN)
    lines = _peer_lost_lines(log)
    assert len(lines) == 1 and f"({hosts.addr['b']}) stopped answering" in lines[0], log[-4000:]
    assert lines[0].split("] ", 1)[1] in (tmp_path / "run" / "train.log").read_text()
    _verify_tags(tmp_path)
    (tmp_path / "probe_dead_host.txt").write_text(f"launcher {took:.1f} s\n" + "\n".join(lines))
    print(f"dead host: launcher exited after {took:.1f} s; {lines[0]}")
    hosts.link("b", up=True)

    env.pop("DWNET_TEST_STEP_DELAY_S")
    # the survivor alone: the one-node form of the same script
    proc = _launch(hosts, tmp_path, "deepspeed.sh", dict(env, NUM_GPUS="1", HOSTFILE=""), digits_betons,
                   name="relaunch")
    rc, log = proc.wait(timeout=600)
    assert rc == 0, log[-4000:]
    assert "world size 2 -> 1" in log, log[-4000:]
    assert _complete(tmp_path)[-1] == f"step_{STEPS:08d}"


def test_wrong_interface_stops_at_the_preflight(tmp_path, hosts, digits_betons):
    """No IFACE: every rank would use eth0 (listed first, leads nowhere). The launch ends within
    60 s with one line naming eth0 and telling the user to set IFACE=eth1."""
    _tree(tmp_path)
    env = _env(tmp_path, hosts)
    start = time.monotonic()
    proc = _launch(hosts, tmp_path, "deepspeed.sh", env, digits_betons)
    rc, log = proc.wait(timeout=120)
    took = time.monotonic() - start
    assert rc not in (0, None), log[-4000:]
    assert took < 60, (took, log[-4000:])
    lines = [line for line in log.splitlines() if "interface check:" in line]
    assert lines, log[-4000:]
    for line in lines:
        assert re.search(r"FAILED: DistError: interface check: rank \d on \S+: the ranks would use interface eth0 "
                         r"\(10\.78\.", line), line
        assert "set IFACE=eth1" in line
    assert not _complete(tmp_path)
    (tmp_path / "probe_wrong_iface.txt").write_text(f"launcher {took:.1f} s\n" + "\n".join(lines))
    print(f"wrong interface: launcher exited after {took:.1f} s; " + " | ".join(lines))


def test_one_rank_on_the_wrong_interface_stops_rank_0_too(tmp_path, hosts, digits_betons):
    """Rank 0 (host a, GLOO_SOCKET_IFNAME=eth1) passes its check; rank 1 (host b, nothing set)
    picks eth0 and fails. Rank 0 must not wait for it until the process-group timeout: it reads
    rank 1's line from the rendezvous store and stops within 60 s as well."""
    _tree(tmp_path)
    base = _env(tmp_path, hosts, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR=hosts.addr["a"], DWNET_DIST_TIMEOUT="600")
    base.pop("HOSTFILE")
    cmd = [sys.executable, REPO / "train.py", "--config", REPO / "ds_configs" / "demo_cpu.yaml",
           *_opts(tmp_path, digits_betons)]
    start = time.monotonic()
    rank0 = hosts.launch("a", cmd, env=dict(base, GLOO_SOCKET_IFNAME="eth1"), cwd=tmp_path, log=tmp_path / "rank0.log")
    rank1 = hosts.launch("b", cmd, env=dict(base, RANK="1"), cwd=tmp_path, log=tmp_path / "rank1.log")
    rc0, log0 = rank0.wait(timeout=120)
    took = time.monotonic() - start
    rc1, log1 = rank1.wait(timeout=30)
    assert rc1 == 1 and "interface check: rank 1" in log1 and "set IFACE=eth1" in log1, log1[-3000:]
    assert rc0 == 1 and took < 60, (took, log0[-3000:])
    assert "FAILED: another rank failed: interface check: rank 1" in log0, log0[-3000:]
