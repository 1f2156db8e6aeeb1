"""dwnet.distributed / dwnet.preflight: environment discovery for every launcher flavour, hostfile
parsing, preflight verdicts, fail-fast exits, and end-to-end launches through deepspeed (pdsh over a
loopback sshd, openmpi), plain mpirun, torchrun and no launcher.

All traffic stays on 127.0.0.1; every process started here is stopped by pid / process group."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch_harness import REPO, Launch, LoopbackSSH, alive, clean_env, free_port, kill_pids  # noqa: E402

from dwnet.distributed import DistError, DistEnv, discover_env, expand_slurm_nodelist  # noqa: E402
from dwnet.preflight import PreflightError, RankReport, judge, parse_hostfile, run_preflight  # noqa: E402

WORKER = REPO / "tests" / "dist_worker.py"
PY = sys.executable
VENV_BIN = Path(PY).parent
LAUNCH_TIMEOUT = 300  # generous: the first launch on a fresh machine JIT-builds DeepSpeed's shm op


# ---- discover_env: one fake environ per launcher flavour -----------------------------------
def test_discover_torchrun():
    env = discover_env({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                        "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert env == DistEnv(3, 16, 3, 8, 0, "node1", 29500, "torchrun")


def test_discover_deepspeed_launcher():
    env = discover_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
                        "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert env == DistEnv(9, 16, 1, 8, 1, "10.0.0.1", 29500, "deepspeed")


def test_discover_plain_env_single_rank_without_master():
    env = discover_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.rank, env.world_size, env.local_world_size, env.launcher) == (0, 1, 1, "env")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_discover_openmpi():
    env = discover_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
                        "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "node1", "MASTER_PORT": "29501"})
    assert env == DistEnv(5, 16, 5, 8, None, "node1", 29501, "openmpi")


def test_discover_openmpi_without_master_needs_rendezvous():
    env = discover_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, mpi_rendezvous=False)
    assert (env.rank, env.world_size, env.launcher, env.master_addr, env.master_port) == (1, 2, "openmpi", "", 0)


def test_discover_pmi_mpich_intel():
    env = discover_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                        "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert env == DistEnv(2, 4, 0, 2, None, "n0", 1234, "pmi")


def test_discover_slurm(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol: built-in node-list expansion
    env = discover_env({"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3",
                        "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "123456",
                        "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert env == DistEnv(11, 16, 3, 8, 1, "gpu07", 10000 + 123456 % 20000, "slurm")


def test_discover_slurm_uneven_nodes_and_explicit_master(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    env = discover_env({"SLURM_PROCID": "8", "SLURM_NTASKS": "10", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                        "SLURM_TASKS_PER_NODE": "8,2", "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert env == DistEnv(8, 10, 0, 2, 1, "head", 4000, "slurm")


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[01-03,07],cpu5,a[9-10]b") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5",
                                                                      "a9b", "a10b"]


def test_discover_no_launcher():
    env = discover_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (0, 1, 0, 1, "none")
    assert env.master_addr == "127.0.0.1"


def test_torchrun_vars_win_over_mpi_and_slurm():
    env = discover_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "a", "MASTER_PORT": "5", "OMPI_COMM_WORLD_RANK": "0",
                        "OMPI_COMM_WORLD_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "env")


@pytest.mark.parametrize("environ, needle", [
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=4 is outside"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR is not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, "LOCAL_RANK=2 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     "OMPI_COMM_WORLD_RANK=2 is outside"),
    ({"PMI_RANK": "0"}, "PMI_SIZE is not"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "a"}, "SLURM_PROCID=3 is outside"),
])
def test_discover_inconsistent_env_is_one_line(environ, needle):
    with pytest.raises(DistError) as err:
        discover_env(environ, mpi_rendezvous=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---- hostfile -----------------------------------------------------------------------------------
def test_parse_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\n\nnode1 slots=8   # first\n  node2 slots=8 max_slots=8\n")
    assert parse_hostfile(path) == [("node1", 8), ("node2", 8)]


@pytest.mark.parametrize("text, line, needle", [
    ("node1 slots=8\nnode2\n", 2, "bad entry 'node2'"),
    ("node1 slots=8\nnode2 gpus=8\n", 2, "bad entry"),
    ("node1 slots=8\n# c\nnode1 slots=4\n", 3, "listed twice (first on line 1)"),
    ("node1 slots=0\n", 1, "slots must be >= 1"),
    ("node1 slots=eight\n", 1, "not an integer"),
    ("node1 slots=8 colour=red\n", 1, "unexpected 'colour=red'"),
])
def test_parse_hostfile_errors_name_the_line(tmp_path, text, line, needle):
    path = tmp_path / "hf"
    path.write_text(text)
    with pytest.raises(PreflightError) as err:
        parse_hostfile(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and needle in str(err.value)


def test_parse_hostfile_empty_or_missing(tmp_path):
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(PreflightError, match="no hosts"):
        parse_hostfile(tmp_path / "empty")
    with pytest.raises(PreflightError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "nope")


def test_example_hostfile_parses():
    assert parse_hostfile(REPO / "hostfile.example") == [("node1", 8), ("node2", 8)]


# ---- preflight verdicts (rank 0's judging, fed with fake per-rank reports) ---------------------
def _reports(n: int, **versions: str) -> list[RankReport]:
    base = {"torch": "2.4.0", "deepspeed": "0.16.0", "timm": "1.0", "ffcv": "1.0.2", "dwnet": "0.1.0+src.x"}
    return [RankReport(rank=r, host=f"node{r // 8 + 1}", versions=dict(base)) for r in range(n)]


def test_judge_ok_and_slots_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [])  # never touch DNS in tests
    hf = tmp_path / "hostfile"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    assert judge(_reports(16), 16, str(hf)) == []
    problems = judge(_reports(8), 8, str(hf))
    assert any("world size 8 launched but" in p and "16 slots" in p for p in problems)


def test_judge_unresolvable_host(tmp_path, monkeypatch):
    def fake(host, *a, **k):
        if host == "node2":
            raise socket.gaierror(-2, "Name or service not known")
        return []
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    hf = tmp_path / "hostfile"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    problems = judge(_reports(16), 16, str(hf))
    assert problems == [f"host 'node2' ({hf}:2) does not resolve from rank 0 (Name or service not known); "
                        "fix /etc/hosts or DNS, or the hostfile"]


def test_judge_missing_files_and_versions():
    reports = _reports(16)
    for r in reports[8:]:
        r.problems = ["missing /data/train.beton"]
        r.versions["torch"] = "2.3.1"
    reports[3].problems = ["cannot write to /ckpt (Permission denied)"]
    problems = judge(reports, 16, None)
    assert "rank 3 on node1: cannot write to /ckpt (Permission denied)" in problems
    assert "ranks 8-15 on node2: missing /data/train.beton" in problems
    assert any(p.startswith("torch differs across ranks: 2.4.0 on ranks 0-7 on node1; 2.3.1 on ranks 8-15 on node2")
               for p in problems)


def test_run_preflight_single_process(tmp_path):
    present = tmp_path / "train.beton"
    present.write_bytes(b"x")
    run_preflight([str(present)], [str(tmp_path / "ckpt")], hostfile="")
    assert (tmp_path / "ckpt").is_dir()
    with pytest.raises(PreflightError) as err:
        run_preflight([str(present), str(tmp_path / "val.beton")], [str(tmp_path / "ckpt")], hostfile="")
    assert f"rank 0 on {socket.gethostname()}: missing {tmp_path / 'val.beton'}" in str(err.value)


def test_run_preflight_checks_beton_structure(tmp_path, digits_betons):
    """A cut-short .beton is named in one line with the fix, on top of the plain file checks."""
    cut = tmp_path / "train.beton"
    cut.write_bytes((digits_betons / "train.beton").read_bytes()[:100_000])
    betons = {"data.train_path": str(cut), "data.val_path": str(digits_betons / "val.beton")}
    with pytest.raises(PreflightError) as err:
        run_preflight([], [str(tmp_path / "ckpt")], hostfile="", beton_files=betons)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"preflight failed: rank 0 on {socket.gethostname()}: "
                                                      f"data.train_path: {cut}: truncated")
    assert f"python -m data_prep verify {cut}" in message
    run_preflight([], [str(tmp_path / "ckpt")], hostfile="", beton_files={"data.val_path": betons["data.val_path"]})


# ---- fail fast --------------------------------------------------------------------------------
@pytest.mark.parametrize("body, code, needle", [
    ("raise RuntimeError('boom')", 1, "FAILED: RuntimeError: boom"),
    ("raise DistError('RANK=4 is outside 0..3')", 1, "FAILED: DistError: RANK=4 is outside"),
    ("sys.exit(3)", 3, ""),
    ("return 0", 0, ""),
])
def test_run_and_exit_on_failure(tmp_path, body, code, needle):
    marker = tmp_path / "atexit-ran"
    script = textwrap.dedent(f"""
        import atexit, sys
        sys.path.insert(0, {str(REPO)!r})
        from dwnet.distributed import DistError, run_and_exit_on_failure
        atexit.register(lambda: open({str(marker)!r}, "w").close())
        def main():
            {body}
        run_and_exit_on_failure(main)
    """)
    env = clean_env(RANK="2", WORLD_SIZE="4")
    proc = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    if code:  # failures skip atexit hooks (they could block on a dead peer)
        assert "rank 2/4 on" in proc.stderr or code == 3
        assert not marker.exists()
    else:
        assert marker.exists()


def test_finished_entry_point_exits_zero_without_the_teardown(tmp_path):
    """A finished run ends through exit_now: a C++ destructor that aborts at interpreter teardown
    (modelled by an atexit hook calling abort) can no longer turn exit code 0 into SIGABRT, and
    what the run printed is flushed."""
    script = textwrap.dedent(f"""
        import atexit, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from dwnet.distributed import exit_now, run_and_exit_on_failure
        atexit.register(os.abort)
        def main():
            print("finished", end="")
            return 0
        exit_now(run_and_exit_on_failure(main))
    """)
    proc = subprocess.run([PY, "-c", script], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "finished"


# ---- end-to-end launches ---------------------------------------------------------------------------
def _read(out: Path, prefix: str, n: int) -> list[dict]:
    files = sorted(out.glob(f"{prefix}*.json"))
    assert len(files) == n, f"expected {n} {prefix}*.json, got {[f.name for f in files]}"
    return sorted((json.loads(f.read_text()) for f in files), key=lambda d: d["rank"])


def _check_world(out: Path, launcher: str, n: int = 2, ranks_per_node: int | None = None) -> list[dict]:
    records = _read(out, "rank", n)
    per_node = ranks_per_node or n
    assert [r["rank"] for r in records] == list(range(n))
    assert {r["world_size"] for r in records} == {n}
    assert [r["local_rank"] for r in records] == [i % per_node for i in range(n)]
    assert {r["local_world_size"] for r in records} == {per_node}
    assert {r["launcher"] for r in records} == {launcher}
    assert {r["allreduce"] for r in records} == {n * (n + 1) / 2}
    for r in records:
        assert not alive(r["pid"]), f"rank {r['rank']} (pid {r['pid']}) still running"
    return records


def _run(cmd: list, tmp: Path, env: dict, timeout: float = LAUNCH_TIMEOUT) -> tuple[int | None, str]:
    proc = Launch(cmd, env=env, cwd=tmp, log=tmp / "launch.log")
    return proc.wait(timeout)


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def loopback_ssh(tmp_path_factory):
    with LoopbackSSH(tmp_path_factory.mktemp("sshd")) as ssh:
        yield ssh


def _deepspeed_env(run: Path, with_file: bool = False) -> dict[str, str]:
    """The runner's environment. DS_ENV_FILE names the .deepspeed_env to read (an absolute path: the
    runner then ignores ~/.deepspeed_env, which is not ours). The file carries what the remote (ssh)
    side needs: one KEY=VALUE per line, no comments (DeepSpeed splits each line on '=')."""
    env_file = run / ".deepspeed_env"
    if with_file:
        env_file.write_text("DS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME=lo\nDWNET_DIST_TIMEOUT=120\n"
                            f"TORCH_EXTENSIONS_DIR={clean_env()['TORCH_EXTENSIONS_DIR']}\n")
    return clean_env(DS_ENV_FILE=str(env_file))


@pytest.mark.slow
def test_launch_without_launcher(run_dir):
    rc, log = _run([PY, WORKER, "--out", run_dir / "out"], run_dir, clean_env())
    assert rc == 0, log
    _check_world(run_dir / "out", "none", n=1)


@pytest.mark.slow
def test_launch_torchrun(run_dir):
    port = free_port()
    cmd = [VENV_BIN / "torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), WORKER, "--out", run_dir / "out"]
    rc, log = _run(cmd, run_dir, clean_env())
    assert rc == 0, log
    _check_world(run_dir / "out", "torchrun")
    # DeepSpeed's CPU shm all-reduce workspaces (~70 MB per rank) must not outlive the run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")


@pytest.mark.slow
def test_launch_deepspeed_pdsh_over_ssh(run_dir, loopback_ssh):
    """pdsh -> ssh -> `cd <cwd>; <venv python> -m deepspeed.launcher.launch` -> 2 ranks. --venv_script
    puts the venv on the remote PATH (else DeepSpeed's JIT ops build with the system ninja and the
    two ninja versions keep invalidating each other's build)."""
    hostfile = run_dir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [VENV_BIN / "deepspeed", "--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--force_multi", "--venv_script", VENV_BIN / "activate",
           WORKER, "--out", run_dir / "out"]
    rc, log = _run(cmd, run_dir, loopback_ssh.client_env(_deepspeed_env(run_dir, with_file=True)))
    assert rc == 0, log
    assert "pdsh -S" in log and "localhost:" in log  # really went through pdsh/ssh
    assert "export GLOO_SOCKET_IFNAME=lo" in log  # forwarded from .deepspeed_env
    records = _check_world(run_dir / "out", "deepspeed")
    assert {r["arg_local_rank"] for r in records} == {0, 1}  # the launcher's --local_rank is accepted
    _assert_no_sessions(loopback_ssh)


def _assert_no_sessions(ssh: LoopbackSSH, wait: float = 15) -> None:
    deadline = time.monotonic() + wait
    while ssh.session_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = ssh.session_pids()
    ssh.kill_sessions()
    assert not left, f"processes left under the test sshd: {left}"


@pytest.mark.slow
def test_preflight_missing_file_on_one_rank_fails_every_rank(run_dir):
    out = run_dir / "out"
    (out / "shard_0.beton").write_bytes(b"data")  # rank 1's file is missing
    cmd = [VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), WORKER, "--out", out, "--mode", "preflight", "--require", str(out / "shard_{rank}.beton")]
    rc, log = _run(cmd, run_dir, clean_env())
    assert rc not in (0, None), log
    verdicts = _read(out, "verdict", 2)
    expected = f"rank 1 on {socket.gethostname()}: missing {out / 'shard_1.beton'}"
    for v in verdicts:
        assert v["error"] and expected in v["error"], v
    assert "FAILED: PreflightError" in log and expected in log
    assert not list(out.glob("rank*.json"))  # nobody went on to train


def _kill_one_rank(run_dir: Path, cmd: list, env: dict, n: int = 2) -> tuple[int | None, float, str, list[int]]:
    out = run_dir / "out"
    proc = Launch(cmd, env=env, cwd=run_dir, log=run_dir / "launch.log")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(list(out.glob("ready*.json"))) < n:
            assert proc.proc.poll() is None, f"launch ended before all ranks were ready:\n{proc.output()}"
            assert time.monotonic() < deadline, f"ranks not ready in time:\n{proc.output()}"
            time.sleep(0.2)
        pids = [r["pid"] for r in _read(out, "ready", n)]
        time.sleep(1.0)  # let a few all-reduces run
        kill_pids([pids[1]])
        start = time.monotonic()
        rc, log = proc.wait(timeout=120)
        return rc, time.monotonic() - start, log, pids
    finally:
        proc.stop()


def _assert_all_gone(pids: list[int]) -> None:
    left = [p for p in pids if alive(p)]
    kill_pids(left)
    assert not left, f"ranks still running after the launcher exited: {left}"


@pytest.mark.slow
def test_killed_rank_ends_two_node_deepspeed_pdsh_launch(run_dir, loopback_ssh):
    """Two 'nodes' (localhost and 127.0.0.1, one rank each, separate launch.py per node): rank 1's
    node launcher dies with it; rank 0 learns through gloo and exits non-zero by itself."""
    hostfile = run_dir / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    cmd = [VENV_BIN / "deepspeed", "--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--venv_script", VENV_BIN / "activate",
           WORKER, "--out", run_dir / "out", "--mode", "loop"]
    env = loopback_ssh.client_env(_deepspeed_env(run_dir, with_file=True))
    rc, took, log, pids = _kill_one_rank(run_dir, cmd, env)
    assert rc not in (0, None), f"rc={rc}\n{log}"
    assert took < 90, log
    assert "rank 0/2" in log and "FAILED" in log, log  # rank 0 noticed the dead peer and exited itself
    _assert_all_gone(pids)
    _assert_no_sessions(loopback_ssh)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_killed_rank_ends_local_launch(run_dir, launcher):
    """The surviving rank makes no collective call ('idle'): the launcher itself must take it down
    (deepspeed's launch.py, torchrun's agent, mpirun's abort)."""
    worker = [WORKER, "--out", run_dir / "out", "--mode", "idle"]
    env = clean_env()
    if launcher == "deepspeed":  # single node, no hostfile: the launch.py path of `deepspeed --num_gpus 8`
        cmd = [VENV_BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] + worker
        env = _deepspeed_env(run_dir)
    elif launcher == "torchrun":
        cmd = [VENV_BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port())] + worker
    else:
        cmd = ["mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", "--mca", "btl", "self,vader", PY] + worker
    rc, took, log, pids = _kill_one_rank(run_dir, cmd, env)
    assert rc not in (0, None), f"rc={rc}\n{log}"
    assert took < 90, log
    _assert_all_gone(pids)


# ---- the launch/ recipes themselves, with a stand-in train.py ---------------------------------------
def _recipe_tree(run: Path) -> Path:
    """run/repo with launch/ copied from the repository and a train.py that runs dist_worker."""
    repo = run / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in (REPO / "launch").iterdir():
        (repo / "launch" / script.name).write_bytes(script.read_bytes())
        (repo / "launch" / script.name).chmod(0o755)
    (repo / "train.py").write_text(f"import runpy\nrunpy.run_path({str(WORKER)!r}, run_name='__main__')\n")
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["deepspeed-1node", "deepspeed-pdsh", "openmpi", "mpirun", "torchrun"])
def test_launch_recipe(run_dir, recipe, loopback_ssh):
    """Each launch/ script end to end. 'openmpi' is `deepspeed --launcher openmpi` with no
    MASTER_ADDR/MASTER_PORT reaching the ranks (mpi4py broadcasts rank 0's choice); 'mpirun' is plain
    `mpirun -np 2 -hostfile H -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=... python train.py`."""
    repo = _recipe_tree(run_dir)
    out = run_dir / "out"
    hostfile = run_dir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(VENV=str(VENV_BIN.parent), IFACE="lo", DWNET_TEST_OUT=str(out), CONFIG="ds_configs/dwnet_tiny.yaml")
    if recipe != "openmpi":
        env["MASTER_PORT"] = str(free_port())
    launcher, n_hosts = {"deepspeed-1node": ("deepspeed", 1), "deepspeed-pdsh": ("deepspeed", 2),
                         "openmpi": ("openmpi", 1), "mpirun": ("openmpi", 1), "torchrun": ("torchrun", 1)}[recipe]
    if recipe == "deepspeed-1node":
        env.update(NUM_GPUS="2")
        script = "deepspeed.sh"
    elif recipe == "deepspeed-pdsh":  # two 'nodes', both this machine through the loopback sshd
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        env = loopback_ssh.client_env(env)
        env.update(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", TMPDIR=str(run_dir / "tmp"))
        (run_dir / "tmp").mkdir()
        # what the remote shells need besides what the recipe adds: a user's ./.deepspeed_env
        (repo / ".deepspeed_env").write_text(f"DS_ACCELERATOR=cpu\nDWNET_TEST_OUT={out}\nDWNET_DIST_TIMEOUT=120\n"
                                             f"TORCH_EXTENSIONS_DIR={env['TORCH_EXTENSIONS_DIR']}\n")
        script = "deepspeed.sh"
    elif recipe == "openmpi":
        env.update(HOSTFILE=str(hostfile), MPI_EXTRA="--allow-run-as-root --oversubscribe -x DWNET_TEST_OUT "
                   "-x DS_ACCELERATOR -x TORCH_EXTENSIONS_DIR", DS_EXTRA="--force_multi --no_ssh_check")
        script = "openmpi.sh"
    elif recipe == "mpirun":
        env.update(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1",
                   MPI_EXTRA="--allow-run-as-root --oversubscribe -x DWNET_TEST_OUT -x DS_ACCELERATOR "
                             "-x TORCH_EXTENSIONS_DIR")
        script = "mpirun.sh"
    else:
        env.update(NPROC_PER_NODE="2")
        script = "torchrun.sh"
    rc, log = _run(["bash", repo / "launch" / script, "--opts", "data.batch_size=4", "optim.epochs=1"], run_dir, env)
    assert rc == 0, log
    records = _check_world(out, launcher, ranks_per_node=2 // n_hosts)
    assert {r["config"] for r in records} == {"ds_configs/dwnet_tiny.yaml"}
    assert all(r["opts"] == ["data.batch_size=4", "optim.epochs=1"] for r in records)  # "$@" reaches train.py
    assert {r["gloo_iface"] for r in records} == {"lo"}
    # torchrun --standalone hosts its own rendezvous on "localhost": loopback as well
    assert {r["master_addr"] for r in records} == ({"localhost"} if recipe == "torchrun" else {"127.0.0.1"})
    if recipe in ("deepspeed-pdsh", "openmpi", "mpirun"):
        assert {r["hostfile"] for r in records} == {str(hostfile)}  # preflight learns the hostfile
    if recipe == "openmpi":
        assert "mpirun -n 2 -hostfile" in log
    if recipe == "deepspeed-pdsh":
        assert "pdsh -S" in log
        assert (run_dir / "tmp").is_dir() and not list((run_dir / "tmp").iterdir())  # generated env file removed
        _assert_no_sessions(loopback_ssh)


# ---- real training through each multi-node launcher --------------------------------------------------
def _training_command(launcher: str, run: Path, betons: Path, port: int) -> list:
    train = [REPO / "train.py", "--config", REPO / "ds_configs" / "demo_cpu.yaml", "--opts",
             f"data.train_path={betons / 'train.beton'}", f"data.val_path={betons / 'val.beton'}",
             "data.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0", "checkpoint.every_steps=0",
             f"checkpoint.dir={run / 'run'}", "log.progress=false"]
    hostfile = run / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    if launcher == "deepspeed-pdsh":
        return [VENV_BIN / "deepspeed", "--hostfile", hostfile, "--launcher", "pdsh", "--force_multi",
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--venv_script", VENV_BIN / "activate",
                *train]
    if launcher == "deepspeed-openmpi":  # no MASTER_* reaches the ranks: mpi4py rendezvous on rank 0
        return [VENV_BIN / "deepspeed", "--hostfile", hostfile, "--launcher", "openmpi", "--force_multi",
                "--no_ssh_check", "--master_addr", "127.0.0.1", "--launcher_args",
                "--allow-run-as-root --oversubscribe -x DS_ACCELERATOR -x GLOO_SOCKET_IFNAME -x TORCH_EXTENSIONS_DIR",
                *train]
    if launcher == "torchrun":
        return [VENV_BIN / "torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), *train]
    return ["mpirun", "-np", "2", "-hostfile", hostfile, "--oversubscribe", "--allow-run-as-root",
            "--mca", "btl", "self,vader", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", PY, *train]


@pytest.mark.slow
def test_real_training_through_each_launcher_gives_the_same_weights(tmp_path, digits_betons, loopback_ssh):
    """train.py itself (demo config, 160 digits, 2 ranks x 16, one epoch = 5 steps) through
    deepspeed+pdsh over the loopback sshd, deepspeed --launcher openmpi, plain mpirun and torchrun: each run
    has both ranks (world size 2 in its log; one rank alone would see other batches and end with
    other weights), writes one complete checkpoint, and all four end with identical weights."""
    from dwnet.checkpoint.layout import checkpoint_root, complete_tags
    from dwnet.checkpoint.export import consolidated_state_dict

    weights = {}
    for launcher in ("deepspeed-pdsh", "deepspeed-openmpi", "mpirun", "torchrun"):
        run = tmp_path / launcher
        run.mkdir()
        env = _deepspeed_env(run, with_file=True)
        if launcher == "deepspeed-pdsh":
            env = loopback_ssh.client_env(env)
        rc, log = _run(_training_command(launcher, run, digits_betons, free_port()), run, env)
        assert rc == 0, f"{launcher}:\n{log[-4000:]}"
        header = (run / "run" / "train.log").read_text()
        assert "world_size: 2\n" in header, header[:2000]
        root = checkpoint_root(str(run / "run"))
        assert complete_tags(root) == ["step_00000005"], os.listdir(root)
        weights[launcher] = consolidated_state_dict(root, "step_00000005")
        if launcher == "deepspeed-pdsh":
            _assert_no_sessions(loopback_ssh)
    reference = weights.pop("deepspeed-pdsh")
    for launcher, state in weights.items():
        assert state.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(state[name], reference[name], atol=0, rtol=0, msg=f"{launcher}: {name}")
