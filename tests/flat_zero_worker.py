"""Two ranks stepping dwnet's flat ZeRO step and DeepSpeed's own ZeRO step on the same batches.

Used by tests/test_flat_zero.py through torch.multiprocessing (gloo, loopback)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from engine_worker import tiny_run_config, weights  # noqa: E402
from poisoned_loaders import changed, model_state  # noqa: E402
from rank_helpers import set_rank_env  # noqa: E402
from tensor_loaders import synthetic_dataset  # noqa: E402

STEPS = 4
BAD_STEP = 2  # 0-based: the optimizer step whose gradients are NaN on rank 1 in the "nan" case


def trainer_for(run_dir: str, rank: int, world_size: int, *overrides: str):
    from dwnet.engine import Trainer

    cfg = tiny_run_config(run_dir, "data.batch_size=8", "optim.base_lr=0.05", "optim.grad_clip=0.5",
                          "optim.accumulation_steps=2", *overrides)
    return Trainer(cfg, rank, world_size, torch.device("cpu"))


def train(trainer, rank: int, nan_at: int | None = None) -> dict:
    """STEPS optimizer steps of 2 micro-batches each on this rank's share of fixed batches;
    with `nan_at`, rank 1's loss is NaN in that step. Returns the weights and what the bad step did."""
    images, labels = synthetic_dataset(STEPS * 2 * 2 * 8, seed=3)
    images = images.view(STEPS, 2, 2, 8, *images.shape[1:])[:, :, rank]
    labels = labels.view(STEPS, 2, 2, 8)[:, :, rank]
    out: dict = {"skipped": [], "grad_norms": []}
    for step in range(STEPS):
        before = model_state(trainer) if step == nan_at else None
        for micro in range(2):
            x = images[step, micro]
            if step == nan_at and rank == 1 and micro == 1:
                x = torch.full_like(x, float("nan"))
            trainer.micro_step(x, labels[step, micro], micro_batch=micro)
        outcome = trainer.finish_step()
        out["skipped"].append(outcome.skipped)
        out["grad_norms"].append(float(trainer.engine.get_global_grad_norm()))
        if before is not None:
            out["changed_by_bad_step"] = changed(before, model_state(trainer))
    out["weights"] = weights(trainer)
    out["fused_step"] = type(trainer.fused_step).__name__ if trainer.fused_step is not None else None
    return out


def main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    set_rank_env(rank, world_size, port)
    from dwnet.distributed import init_distributed

    init_distributed()
    results = {}
    for stage in (1, 2):
        for fused in (True, False):
            name = f"z{stage}_{'flat' if fused else 'deepspeed'}"
            trainer = trainer_for(os.path.join(out_dir, name), rank, world_size, f"engine.zero_stage={stage}",
                                  f"engine.fused_step={str(fused).lower()}")
            results[name] = train(trainer, rank)
        trainer = trainer_for(os.path.join(out_dir, f"z{stage}_nan"), rank, world_size, f"engine.zero_stage={stage}")
        results[f"z{stage}_nan"] = train(trainer, rank, nan_at=BAD_STEP)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
