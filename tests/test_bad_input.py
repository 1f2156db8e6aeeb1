"""Bad input met through the command lines, as a user meets it: each case must end with one line
naming the file or key, the problem and the fix, a non-zero exit, no traceback, and nothing lost
(data files unchanged, nothing half-written left behind).

Issue 13's table: a cut-short or foreign .beton (training and --eval), out-of-range config values,
a batch larger than a rank's share of the data, an unwritable data_prep --out, an unreadable image
under the imagefolder backend.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_digits_tree

from launch_harness import clean_env

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SMALL_RUN = ["model.name=dwnet_femto", "model.num_classes=10", "data.image_size=32", "data.batch_size=16",
             "data.num_workers=1", "optim.epochs=1", "optim.warmup_epochs=0", "log.progress=false",
             "log.tensorboard=false", "augment.rand_augment=", "augment.mixup=0", "augment.cutmix=0"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=cwd, env=clean_env(OMP_NUM_THREADS="1", **env), capture_output=True,
                          text=True, timeout=600)


def one_line_failure(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The failure line of a train.py run: exit `code`, no traceback, the last stderr line."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    failures = [line for line in result.stderr.splitlines() if "FAILED:" in line]
    assert len(failures) == 1 and result.stderr.strip().splitlines()[-1] == failures[0], result.stderr[-3000:]
    return failures[0]


def digest(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def train_args(train: Path | str, val: Path | str, run_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "train.py"), "--opts", f"data.train_path={train}", f"data.val_path={val}",
            f"checkpoint.dir={run_dir}", *SMALL_RUN, *extra]


# ---- a cut-short or foreign .beton ---------------------------------------------------------------
@pytest.mark.slow  # train.py through init_distributed: ~10 s
def test_cut_short_train_beton_stops_training_in_one_line(digits_betons, tmp_path):
    train = tmp_path / "train.beton"
    data = (digits_betons / "train.beton").read_bytes()
    train.write_bytes(data[: len(data) // 2])  # an interrupted copy
    before = digest(train, digits_betons)
    result = run(train_args(train, digits_betons / "val.beton", tmp_path / "run"), tmp_path)
    line = one_line_failure(result)
    assert f"data.train_path: {train}: truncated" in line and f"python -m data_prep verify {train}" in line
    assert "re-copy" in line and "PreflightError" in line
    assert digest(train, digits_betons) == before                    # nothing touched
    assert not (tmp_path / "run" / "checkpoints").exists()          # stopped before any training work


@pytest.mark.slow  # train.py through init_distributed: ~10 s
def test_foreign_val_file_stops_eval_in_one_line(digits_betons, tmp_path):
    val = tmp_path / "val.beton"
    val.write_text("these are not the images you are looking for\n" * 20)
    result = run([*train_args(digits_betons / "train.beton", val, tmp_path / "run"), "--eval", "--resume",
                  str(tmp_path / "model.pth")], tmp_path)
    line = one_line_failure(result)
    assert f"data.val_path: {val}: not an ffcv .beton" in line and f"python -m data_prep verify {val}" in line
    assert val.read_text().startswith("these are not")


# ---- config values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.num_classes=0", "model.num_classes=0 must be > 0"),
    ("optim.base_lr=nan", "optim.base_lr=nan must be a finite number"),
])
def test_bad_config_value_is_one_line_before_start_up(tmp_path, override, message):
    result = run([str(REPO / "train.py"), "--opts", override, f"checkpoint.dir={tmp_path / 'run'}"], tmp_path)
    assert message in one_line_failure(result)
    assert not (tmp_path / "run").exists()  # rejected before anything was created


def test_debug_shows_the_traceback(tmp_path):
    result = run([str(REPO / "train.py"), "--opts", "augment.mixup=-1"], tmp_path, DWNET_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "FAILED: ConfigError: augment.mixup=-1.0 must be >= 0" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # train.py through init_distributed: ~10 s
def test_batch_larger_than_the_data_is_one_config_line(digits_betons, tmp_path):
    before = digest(digits_betons)
    result = run(train_args(digits_betons / "train.beton", digits_betons / "val.beton", tmp_path / "run",
                            "data.batch_size=256"), tmp_path)
    line = one_line_failure(result)
    assert "ConfigError: data.batch_size=256 is larger than a rank's share" in line
    assert "lower data.batch_size to at most 160" in line
    assert digest(digits_betons) == before and not (tmp_path / "run" / "checkpoints").exists()


# ---- the imagefolder backend meets an unreadable image ------------------------------------------------
@pytest.mark.slow  # train.py through init_distributed: ~10 s
def test_imagefolder_names_the_unreadable_image_in_its_last_line(tmp_path):
    root = tmp_path / "tree"
    write_digits_tree(root / "train", 0, 64)
    write_digits_tree(root / "val", 64, 16)
    bad = sorted((root / "train").rglob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    before = digest(root)
    result = run(train_args(root / "train", root / "val", tmp_path / "run", "data.backend=imagefolder",
                            "checkpoint.every_steps=0"), tmp_path)
    line = one_line_failure(result)
    assert f"DataError: {bad}: unreadable image (truncated" in line and "data_prep convert" in line
    assert "DataLoader worker" not in result.stderr
    assert digest(root) == before


# ---- data_prep convert into a folder that cannot be written ----------------------------------------------
def test_unwritable_out_is_one_line_and_writes_nothing(digits_root, tmp_path):
    from test_data_prep import _without_permission_override

    locked = tmp_path / "locked"
    locked.mkdir()
    before = digest(digits_root)
    locked.chmod(0o555)
    try:
        result = subprocess.run([*_without_permission_override(), PY, "-m", "data_prep", "convert", "--root",
                                 str(digits_root), "--out", str(locked / "out")], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: --out {locked / 'out'}: cannot write there (Permission denied); pass a writable "
                     "--out folder or fix its permissions (nothing was converted)"]
    assert list(locked.iterdir()) == [] and digest(digits_root) == before
