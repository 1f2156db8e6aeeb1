"""Rank worker for tests/test_elastic.py (torch.multiprocessing, gloo, loopback).

    save:   train one epoch per setting in OUT/<name>, save, write the state right after the save
    resume: resume each setting's run directory on this world size, write the state right after it
    train:  train two epochs from scratch (for the world-size invariance test), write the weights

The state is everything a resume must bring back: fp32 master parameters, Adam moments and step,
module buffers (BatchNorm statistics), EMA, LR, scheduler state and progress, each whole (ZeRO
partitions are gathered through DeepSpeed's own accessors).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from engine_worker import tiny_run_config, weights  # noqa: E402
from rank_helpers import set_rank_env  # noqa: E402
from tensor_loaders import TensorTrainLoader, synthetic_dataset  # noqa: E402

SAMPLES = 128  # 4 steps per epoch at global batch 32


def overrides(setting: str) -> list[str]:
    """'z2_bf16' -> ZeRO-2 in bf16; EMA on where ZeRO allows it (not under ZeRO-3)."""
    stage, precision = setting.split("_")
    stage = int(stage[1:])
    return [f"engine.zero_stage={stage}", f"engine.precision={precision}", f"engine.ema={stage < 3}",
            "engine.ema_decay=0.5", "data.batch_size=8"]


def make_trainer(run_dir: str, setting: str, rank: int, world_size: int, *extra: str):
    from dwnet.engine import Trainer

    cfg = tiny_run_config(run_dir, *overrides(setting), *extra)
    images, labels = synthetic_dataset(SAMPLES)
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, rank, world_size, seed=cfg.engine.seed)
    return Trainer(cfg, rank, world_size, torch.device("cpu"), train_loader=train)


def state(trainer) -> dict[str, object]:
    """Collective (ZeRO-3 gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    plain = engine.zero_optimization_stage() == 0
    masters = {}  # bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters, group by group
    if plain and hasattr(engine.optimizer, "fp32_groups"):
        low = [p for group in engine.optimizer.fp16_groups for p in group]
        high = [p for group in engine.optimizer.fp32_groups for p in group]
        masters = {id(lp): hp for lp, hp in zip(low, high)}
    base = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if getattr(engine.optimizer, "_hp_optimizer_states_linked", False):
        # ZeRO-1/2 link each parameter to its Adam moments once, right after the first param
        # group's first step, when the second group has no moments yet: link again to read them.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out: dict[str, object] = {}
    for name, param in engine.module.named_parameters():
        master = masters.get(id(param), param) if plain else None
        if plain:  # whole fp32 parameters (or their fp32 masters) and moments on every rank
            moments = base.state[master]
            out[f"fp32.{name}"] = master.detach().float().clone()
            out[f"exp_avg.{name}"] = moments["exp_avg"].clone()
            out[f"exp_avg_sq.{name}"] = moments["exp_avg_sq"].clone()
        else:
            out[f"fp32.{name}"] = safe_get_full_fp32_param(param).clone()
            out[f"exp_avg.{name}"] = safe_get_full_optimizer_state(param, "exp_avg").clone()
            out[f"exp_avg_sq.{name}"] = safe_get_full_optimizer_state(param, "exp_avg_sq").clone()
    out["adam_steps"] = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    out.update({f"buffer.{k}": v for k, v in weights(trainer).items() if "running" in k or "num_batches" in k})
    if trainer.ema is not None:
        out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.module.state_dict().items()})
    out["lr"] = [group["lr"] for group in trainer.optimizer.param_groups]
    out["scheduler"] = {k: v for k, v in trainer.scheduler.state_dict().items()}
    progress = trainer.progress.state()
    progress.pop("world_history")
    out["progress"] = progress
    return out


def main(rank: int, world_size: int, port: int, phase: str, out_dir: str, settings: list[str],
         extra: list[str]) -> None:
    set_rank_env(rank, world_size, port)
    from dwnet.distributed import init_distributed

    init_distributed()
    for setting in settings:
        run_dir = os.path.join(out_dir, setting)
        if phase == "train":
            trainer = make_trainer(run_dir, setting, rank, world_size, "optim.epochs=2", *extra)
            trainer.fit()
            result = weights(trainer)
        elif phase == "save":
            trainer = make_trainer(run_dir, setting, rank, world_size, "optim.epochs=1", *extra)
            trainer.fit()
            result = state(trainer)
        else:
            trainer = make_trainer(run_dir, setting, rank, world_size, "optim.epochs=1", *extra)  # same schedule
            result = {**state(trainer), "resume_tag": trainer.resume_tag,
                      "accumulation_steps": trainer.cfg.optim.accumulation_steps}
            trainer.checkpointer.save(suffix=f"w{world_size}")  # a tag of this world size, for the next resume
        # Rank 0's is the result; the others' are kept to check that every rank holds the same state.
        name = f"{setting}.{phase}.pt" if rank == 0 else f"{setting}.{phase}.rank{rank}.pt"
        torch.save(result, os.path.join(out_dir, name))
