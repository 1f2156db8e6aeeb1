#!/usr/bin/env python
"""The steps of `bench/gpu_check.sh` after installation: CUDA tests, a generated JPEG tree (converted
by `data_prep` when ffcv imports), the training benchmark, and one JSON (`gpu_check.json`) plus a
printed table of everything.

Every step runs in its own process with its own time limit, so one that hangs or crashes costs
only its own figures; the deadline (`--budget-s`) is shared, and the training benchmark gets what
the tests leave. Exit code: 0 when every step passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")

# Sizes of the real check (one GPU) and of the CPU dry run that `make test` runs so this never rots.
GPU_SIZES = dict(images=8192, classes=100, width=500, height=375, image_size=224, batch=128, warmup=8, steps=30,
                 models=["dwnet_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224"], compile=True, sweep=True)
# --quick: the CUDA tests and the loader comparison of dwnet_tiny only (about 2 minutes).
QUICK_SIZES = dict(GPU_SIZES, images=4096, warmup=6, steps=20, models=["dwnet_tiny"], compile=False, sweep=False)
DRY_SIZES = dict(images=64, classes=4, width=64, height=48, image_size=32, batch=8, warmup=1, steps=2,
                 models=["dwnet_femto", "convnext_tiny", "swin_tiny_patch4_window7_224"], compile=False, sweep=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the logs")
    p.add_argument("--budget-s", type=float, default=420, help="wall-clock budget for all steps")
    p.add_argument("--cpu-dry-run", action="store_true", help="CPU, tiny sizes: proves the script, measures nothing")
    p.add_argument("--quick", action="store_true", help="GPU: the tests and dwnet_tiny's loaders only")
    return p.parse_args(argv)


def run_step(name: str, cmd: list[str], out_dir: str, timeout_s: float) -> dict[str, Any]:
    """Runs one step with its output teed to <out>/<name>.log; kills its process group at the
    limit; never raises."""
    log_path = os.path.join(out_dir, f"{name}.log")
    start = time.monotonic()
    print(f"[gpu_check] {name}: {' '.join(cmd)} (limit {timeout_s:.0f} s)", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                start_new_session=True)

        def tee() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if not line.startswith("[rank"):  # DeepSpeed's per-rank chatter stays in the log
                    sys.stdout.write(line)

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            code: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        reader.join(timeout=10)
    seconds = time.monotonic() - start
    print(f"[gpu_check] {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s", flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "log": os.path.basename(log_path)}


def junit_summary(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {"error": "no junit report (pytest did not finish)"}
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    summary: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": {}, "seconds": {}}
    for case in cases:
        name = case.get("name", "?")
        summary["seconds"][name] = round(float(case.get("time", 0)), 1)
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            summary["failed"] += 1
            summary["failures"][name] = (problem.get("message") or "")[:400]
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
        else:
            summary["passed"] += 1
    return summary


def environment(python: str) -> dict[str, Any]:
    result = subprocess.run([python, os.path.join(BENCH, "gpu_env.py")], capture_output=True, text=True, cwd=REPO)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (result.stderr or result.stdout)[-400:], "ffcv_import": "environment probe failed"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sizes = DRY_SIZES if args.cpu_dry_run else QUICK_SIZES if args.quick else GPU_SIZES
    deadline = time.monotonic() + args.budget_s
    python = sys.executable
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu-quick" if args.quick else "gpu", "sizes": sizes, "steps": {}}
    report["environment"] = env = environment(python)
    backend = "ffcv" if env.get("ffcv_import") == "ok" else "imagefolder"
    report["backend"] = backend
    report["backend_note"] = ("ffcv .beton loader" if backend == "ffcv" else
                              f"ImageFolder backend: ffcv is not importable here ({env.get('ffcv_import')})")

    junit = os.path.join(args.out, "gpu_tests.xml")
    report["steps"]["gpu_tests"] = run_step(
        "gpu_tests", [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                      f"--junitxml={junit}", "-o", "addopts=", "--timeout=90"],
        args.out, timeout_s=min(240.0, max(90.0, deadline - time.monotonic() - 60)))
    report["gpu_tests"] = junit_summary(junit)

    data = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dwnet_gpu_check_photos_{sizes['images']}")
    report["steps"]["dataset"] = run_step(
        "dataset", [python, os.path.join(BENCH, "photo_tree.py"), data, "--images", str(sizes["images"]),
                    "--classes", str(sizes["classes"]), "--width", str(sizes["width"]),
                    "--height", str(sizes["height"])], args.out, timeout_s=120)
    train_data = data
    if backend == "ffcv":  # the production path: the tree converted by data_prep, read by ffcv
        beton_dir = data + "_ffcv"
        report["steps"]["convert"] = run_step(
            "convert", [python, "-m", "data_prep", "convert", "--train-root", data, "--out", beton_dir,
                        "--num-workers", str(os.cpu_count() or 1)], args.out, timeout_s=240)
        train_data = os.path.join(beton_dir, "train.beton")
    train_json = os.path.join(args.out, "gpu_train.json")
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    train_cmd = [python, os.path.join(BENCH, "gpu_train.py"), "--data", train_data, "--out", train_json,
                 "--device", "cpu" if args.cpu_dry_run else "cuda", "--image-size", str(sizes["image_size"]),
                 "--batch", str(sizes["batch"]), "--warmup", str(sizes["warmup"]), "--steps", str(sizes["steps"]),
                 "--workers", str(workers), "--models", *sizes["models"], "--backend", backend,
                 "--num-classes", str(sizes["classes"]),
                 "--budget-s", f"{max(10.0, deadline - time.monotonic() - 60):.0f}"]
    if backend == "ffcv":
        train_cmd += ["--compare-imagefolder", data]
    train_cmd += ["--compile"] * sizes["compile"] + ["--sweep"] * sizes["sweep"]
    report["steps"]["train_bench"] = run_step("train_bench", train_cmd, args.out,
                                              timeout_s=max(30.0, deadline - time.monotonic()))
    if os.path.isfile(train_json):
        with open(train_json) as fh:
            report["train"] = json.load(fh)

    failed = [name for name, step in report["steps"].items() if step["exit"] != 0]
    report["failed_steps"] = failed
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    tests = report["gpu_tests"]
    print(f"[gpu_check] device: {env.get('gpu') or 'cpu'}; torch {env.get('torch')} (CUDA {env.get('cuda')}, "
          f"cuDNN {env.get('cudnn')}), deepspeed {env.get('deepspeed')}, timm {env.get('timm')}; loader: "
          f"{report['backend_note']}")
    print(f"[gpu_check] gpu tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
          f"{tests.get('skipped', 0)} skipped" + "".join(f"\n  FAILED {k}: {v}" for k, v in tests.get("failures", {}).items()))
    print("[gpu_check] steps: " + ", ".join(f"{k} {v['exit']} ({v['seconds']} s)" for k, v in report["steps"].items()))
    print(f"[gpu_check] report: {os.path.join(args.out, 'gpu_check.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
