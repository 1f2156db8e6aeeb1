"""`bench/gpu_check.sh --cpu-dry-run`: the GPU check's every step, on CPU with tiny sizes, so the
script that runs on a rare GPU machine is known to work before it gets there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from launch_harness import clean_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "out"
    env = clean_env(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-dry-run" and report["failed_steps"] == []
    tests = report["gpu_tests"]
    assert tests["failed"] == 0 and tests["skipped"] >= 10  # collected, and skipped without a GPU
    train = report["train"]
    assert [m["model"] for m in train["models"]] == ["dwnet_femto", "convnext_tiny", "swin_tiny_patch4_window7_224"]
    for model in train["models"]:
        for case in ("loader", "engine"):
            figures = model[case]
            assert figures["images_per_s"] > 0 and 0 < figures["mfu"] < 1, (model["model"], case, figures)
        assert 0 <= model["loader"]["data_time_fraction"] < 1
        assert model["fwd_gflops_per_image"] > 0
    assert set(train["ratios"]) == {"dwnet_femto / swin_tiny_patch4_window7_224", "dwnet_femto / convnext_tiny"}
    profile = train["profile"]
    assert profile["rows"] and profile["host_top"] and profile["device_busy_ms_per_step"] > 0, profile
    if report["backend"] == "ffcv":  # the production path, compared with ImageFolder+PIL on the same engine
        assert train["models"][0]["loader_imagefolder"]["images_per_s"] > 0
    sweep = {row["case"]: row for row in train["sweep"]}
    assert len(sweep) == 6 and all(row["images_per_s"] > 0 for row in sweep.values()), sweep
    assert "engine img/s" in proc.stdout and "[gpu_check] report:" in proc.stdout
