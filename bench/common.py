"""Shared helpers for the benchmarks: interleaved timing, machine description, tables.

Timings on a shared machine drift by tens of percent within a minute, so every benchmark times
its cases *interleaved* (A, B, A, B, ...) and reports medians: a ratio of two medians taken in
the same rounds is meaningful even when the absolute figures are not. The clock itself (device
synchronisation included) is `dwnet.timing`'s, shared with `train.py --throughput`.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable

# Benchmarks run as `python bench/x.py` from the repository root: make `dwnet` importable.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
# On a shared machine an OpenMP thread that spins at a barrier while its partner is descheduled
# makes 2-thread runs up to 10x slower; passive waiting keeps them usable. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():  # a CUDA build of torch on a CPU machine: keep DeepSpeed on CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def interleaved_times(cases: dict[str, Callable[[], object]], *, repeats: int = 5, iters: int = 2,
                      warmup: int = 2, device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each case, one sample per round; the cases alternate within a round.

    Each case gets `warmup` untimed calls first (allocator, oneDNN primitive caches, compilation).
    """
    # Imported here: dwnet.engine loads DeepSpeed, which fixes its accelerator at import, and the
    # benchmarks set DS_ACCELERATOR for their ranks after importing this module.
    from dwnet.timing import seconds_per_call

    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats):
        # Alternate the order each round so neither case always follows the other.
        order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
        for name in order:
            samples[name].append(seconds_per_call(cases[name], device, iters))
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def round_ratios(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Per-round time ratios slow/fast (same round = same machine conditions): median, min, max."""
    ratios = [a / b for a, b in zip(slow, fast)]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread(values: list[float]) -> float:
    """(max - min) / median: how noisy a case was, for the reader to judge the ratios."""
    return (max(values) - min(values)) / statistics.median(values)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, str]:
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "load avg (1 min)": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "torch threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "-"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for pkg in ("timm", "deepspeed"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # not installed / broken import: the benchmark that needs it will say so
            pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_machine(device: str = "cpu") -> None:
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine_info(device).items()))


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table (also readable as plain text)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def set_rank_env(rank: int, world_size: int, port: int, **extra: str) -> None:
    """The variables a launcher would give a spawned benchmark rank (all on 127.0.0.1)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


def build_engine(model_name: str, *, precision: str, zero_stage: int, batch: int, image_size: int,
                 run_dir: str, world_size: int):
    """The engine train.py builds for this model and setting, built by the same code: a
    `dwnet.engine.Trainer` without loaders (run config -> model -> AdamW groups with scaled LRs ->
    generated DeepSpeed config -> deepspeed.initialize), on an initialised process group. The
    trainer logs its config header to `run_dir`/train.log and stdout. Returns (engine, num_classes)."""
    import torch.distributed as dist

    from dwnet.config import load_config
    from dwnet.distributed import training_device
    from dwnet.engine import Trainer

    cfg = load_config(None, [
        f"model.name={model_name}", f"engine.precision={precision}", f"engine.zero_stage={zero_stage}",
        f"data.batch_size={batch}", f"data.image_size={image_size}", "log.tensorboard=false",
        f"checkpoint.dir={run_dir}", "checkpoint.auto_resume=false"])
    trainer = Trainer(cfg, rank=dist.get_rank(), world_size=world_size, device=training_device())
    return trainer.engine, cfg.model.num_classes
