"""The real job on real images: data_prep -> .beton -> train.py on 2 ranks -> SIGKILL of one rank
-> every rank exits -> relaunch resumes -> the same weights as an uninterrupted run; eval and
export through train.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dwnet.distributed import free_port
from launch_harness import clean_env  # the test process's own RANK/MASTER_* must not leak in

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(PY).parent / "torchrun")
DEEPSPEED = str(Path(PY).parent / "deepspeed")
CONFIG = "ds_configs/demo_cpu.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_betons(tmp_path_factory) -> Path:
    """The demo's data (all 1,797 digits, stratified 80/20) converted by data_prep; larger than
    conftest's digits_betons so that a run spans several checkpoints."""
    from dwnet.demo import write_digits_tree

    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(str(root / "tree"))
    run_checked([PY, "-m", "data_prep", "convert", "--train-root", str(root / "tree/train"),
                 "--val-root", str(root / "tree/val"), "--out", str(root / "beton"), "--max-resolution", "32",
                 "--num-workers", "2"])
    return root / "beton"


def run_checked(cmd: list[str]) -> None:
    """Runs a CLI step; on failure the assertion shows its own output, not just an exit status."""
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd[1:4]} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def opts(betons: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--opts", f"data.train_path={betons}/train.beton", f"data.val_path={betons}/val.beton",
            f"checkpoint.dir={run_dir}", "optim.epochs=2", "optim.warmup_epochs=1", "checkpoint.every_steps=5",
            "log.progress=false", "data.num_workers=1", *extra]


def launch(betons: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", CONFIG, *opts(betons, run_dir)]
    env = clean_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def export(run_dir: Path, out: Path, betons: Path) -> dict:
    run_checked([PY, "train.py", "--config", CONFIG, "--export", str(out), "--checkpoint-tag", "latest",
                 *opts(betons, run_dir)])
    return torch.load(out, weights_only=True)["model"]


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process the launcher started for `rank` (found by its RANK variable)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} under launcher pid {launcher.pid}")


@pytest.fixture(scope="module")
def reference_run(demo_betons, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (ZeRO-2) the interrupted ones must end like."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    wait(launch(demo_betons, run_dir, run_dir.parent / "reference.log"), 600, run_dir.parent / "reference.log")
    return run_dir


def test_killed_rank_ends_the_run_and_relaunch_ends_with_the_same_weights(demo_betons, reference_run, tmp_path):
    reference_dir, killed_dir = reference_run, tmp_path / "killed"

    proc = launch(demo_betons, killed_dir, tmp_path / "killed.log")
    marker = killed_dir / "checkpoints" / "step_00000030" / "COMPLETE"  # mid epoch 1 (22 steps per epoch)
    deadline = time.time() + 600
    try:
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 30 in time"
            time.sleep(0.2)
        ranks = [rank_process(proc, 0), rank_process(proc, 1)]
        ranks[1].kill()  # SIGKILL one rank, no goodbye: the other must not hang in a collective
        assert proc.wait(timeout=120) != 0, "the launcher reported success after losing a rank"
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks still running after the launcher exited: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (killed_dir / "checkpoints" / "step_00000044").exists()

    wait(launch(demo_betons, killed_dir, tmp_path / "resumed.log"), 600, tmp_path / "resumed.log")
    assert "resumed from step_000000" in (tmp_path / "resumed.log").read_text()

    expected = export(reference_dir, tmp_path / "reference.pth", demo_betons)
    got = export(killed_dir, tmp_path / "resumed.pth", demo_betons)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)

    rows = (killed_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # each epoch recorded once


def launch_deepspeed(betons: Path, run_dir: Path, log: Path, ranks: int, *extra: str) -> subprocess.Popen:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", CONFIG, *opts(betons, run_dir, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_at(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    """SIGKILLs the whole launch (every rank: a node lost) once `marker` exists."""
    deadline = time.time() + 600
    try:
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"no {marker} in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def final_step(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "COMPLETE").read_text())["step"]


def test_run_killed_on_two_ranks_finishes_on_one_rank_or_at_zero_3_like_the_uninterrupted_run(
        demo_betons, reference_run, tmp_path):
    """The issue's scenario: the demo's 2-rank ZeRO-2 run loses its ranks mid-epoch 1 and comes back
    on 1 rank (accumulation 1 -> 2: the global batch of 64 is kept), or on 2 ranks at ZeRO-3."""
    killed = tmp_path / "killed"
    kill_at(launch_deepspeed(demo_betons, killed, tmp_path / "killed.log", 2),
            killed / "checkpoints" / "step_00000030" / "COMPLETE", tmp_path / "killed.log")
    at_zero3 = tmp_path / "zero3"
    shutil.copytree(killed, at_zero3)

    wait(launch_deepspeed(demo_betons, killed, tmp_path / "one_rank.log", 1), 900, tmp_path / "one_rank.log")
    log = (tmp_path / "one_rank.log").read_text()
    assert "world size 2 -> 1: accumulation 1 -> 2, global batch 64 kept" in log, log[-3000:]
    assert "resumed from step_00000030: epoch 1, step 8 of 22 in it" in log
    assert "converting step_00000030 to DeepSpeed's universal format for this rank layout" in log
    assert final_step(killed) == final_step(reference_run) == 44
    expected = export(reference_run, tmp_path / "reference.pth", demo_betons)
    got = export(killed, tmp_path / "one_rank.pth", demo_betons)
    params = [k for k in expected if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                                     "attn2conv.conv.bias"))]  # see test_elastic.py
    diffs = torch.cat([(got[k] - expected[k]).abs().flatten() for k in params])
    assert int((diffs > 1e-4).sum()) <= diffs.numel() // 10_000 and diffs.max() < 1e-3, diffs.max()
    history = json.loads((killed / "checkpoints" / "step_00000044" / "COMPLETE").read_text())["world_history"]
    assert [(h["world_size"], h["accumulation_steps"]) for h in history] == [(2, 1), (1, 2)]
    assert [r.split(",")[11] for r in (killed / "metrics.csv").read_text().splitlines()] == ["world_size", "2", "1"]

    wait(launch_deepspeed(demo_betons, at_zero3, tmp_path / "zero3.log", 2, "engine.zero_stage=3"), 900,
         tmp_path / "zero3.log")
    assert "engine.zero_stage 2 -> 3: optimizer state resharded" in (tmp_path / "zero3.log").read_text()
    assert final_step(at_zero3) == 44


def test_eval_of_exported_checkpoint_counts_every_image_once(demo_betons, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", CONFIG, *opts(demo_betons, run_dir, "optim.epochs=1", "optim.warmup_epochs=0")]
    wait(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, start_new_session=True), 600, log)
    exported = export(run_dir, tmp_path / "model.pth", demo_betons)
    assert exported["head.weight"].shape == (10, 256)
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", CONFIG, "--eval", "--resume", str(tmp_path / "model.pth"),
           *opts(demo_betons, run_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         timeout=600, start_new_session=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"eval"')][-1])["eval"]
    assert result["samples"] == 360  # the whole val split, no padding counted, nothing twice
    assert 0 <= result["top1"] <= result["top5"] <= 100
