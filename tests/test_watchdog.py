"""dwnet.distributed.watchdog on loopback: a rank that stops answering (SIGSTOP: alive but silent,
as behind a cut link) or dies (SIGKILL) ends its peers within DWNET_PEER_TIMEOUT with one line
naming it; a pause longer than the bound (a slow save) and a peer that finished first do not.
The two-host (network namespace) versions of these are in tests/test_twohosts.py."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch_harness import REPO, _die_with_parent, clean_env, free_port, kill_pids  # noqa: E402

from dwnet.distributed import DistError  # noqa: E402
from dwnet.distributed.watchdog import peer_timeout_s  # noqa: E402

WORKER = REPO / "tests" / "watchdog_worker.py"
BOUND = 4.0


def _start(tmp: Path, *args: str, timeout: float = BOUND) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        DWNET_PEER_TIMEOUT=str(timeout))
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, "--out", str(tmp), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
    return procs


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a rank ended early"
        assert time.monotonic() < deadline, f"{path.name} not written in time"
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    kill_pids([p.pid for p in procs if p.poll() is None])
    for p in procs:
        p.wait(timeout=10)


def test_peer_timeout_setting():
    assert peer_timeout_s({}) == 90
    assert peer_timeout_s({"DWNET_PEER_TIMEOUT": "30"}) == 30
    assert peer_timeout_s({"DWNET_PEER_TIMEOUT": "0"}) == 0
    for bad in ("soon", "1", "-5"):
        with pytest.raises(DistError, match=f"DWNET_PEER_TIMEOUT='{bad}' is not a number of seconds >= 2; set e.g."):
            peer_timeout_s({"DWNET_PEER_TIMEOUT": bad})


@pytest.mark.slow
def test_silent_peer_ends_the_other_rank_but_a_slow_one_does_not(tmp_path):
    procs = _start(tmp_path, "--slow-rank", "1", "--slow-s", str(2.5 * BOUND))
    try:
        _wait_for(tmp_path / "slow-done0", procs)  # rank 0 waited 2.5 bounds in an all-reduce: no alarm
        assert all(p.poll() is None for p in procs)
        procs[1].send_signal(signal.SIGSTOP)  # alive, silent: what a cut link looks like
        start = time.monotonic()
        rc = procs[0].wait(timeout=BOUND + 30)
        took = time.monotonic() - start
    finally:
        _stop(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert rc == 1, log
    assert BOUND - 1 < took < BOUND + 10, took
    lines = [line for line in log.splitlines() if "PEER LOST" in line]
    assert len(lines) == 1 and "rank 1 on" in lines[0] and "(127.0.0.1)" in lines[0], log
    assert "relaunch the same command to resume" in lines[0]
    assert lines[0] in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_silent_rank_0_ends_the_other_rank(tmp_path):
    """(A killed rank on loopback is noticed by gloo at once: its sockets are reset. Silence is the
    watchdog's case; a whole host killed is tested across namespaces.)"""
    procs = _start(tmp_path)
    try:
        _wait_for(tmp_path / "ready1", procs)
        procs[0].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        rc = procs[1].wait(timeout=BOUND + 30)
        took = time.monotonic() - start
    finally:
        _stop(procs)
    log = (tmp_path / "rank1.log").read_text()
    assert rc == 1 and took < BOUND + 10, log
    assert "PEER LOST: rank 0 on 127.0.0.1 stopped answering" in log
    assert "PEER LOST" in (tmp_path / "train.log").read_text()  # rank 0 cannot write it: rank 1 does


@pytest.mark.slow
def test_a_finished_peer_is_not_a_lost_one(tmp_path):
    procs = _start(tmp_path, "--steps", "5", "--linger-rank", "0")
    try:
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        _stop(procs)
    assert rcs == [0, 0], (tmp_path / "rank0.log").read_text()
    assert "PEER LOST" not in (tmp_path / "rank0.log").read_text()
