"""Runs short trainings for several engine settings on one process group, writing loss curves.

Used by tests/test_engine.py through torch.multiprocessing (2 ranks, gloo, loopback)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from rank_helpers import set_rank_env  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402


def tiny_run_config(run_dir: str, *overrides: str):
    from dwnet.config import load_config

    return load_config(None, [
        "model.name=dwnet_femto", "model.num_classes=10", "model.drop_path_rate=0.0",
        "data.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=0", "optim.base_lr=0.02",
        "augment.label_smoothing=0.0", "log.every_steps=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every_steps=0", f"checkpoint.dir={run_dir}", *overrides])


def weights(trainer) -> dict[str, torch.Tensor]:
    """Whole fp32 copies of every parameter and buffer (ZeRO-3 partitions are gathered first)."""
    import deepspeed

    module = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()),
                                           enabled=trainer.engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def loss_curve(cfg, rank: int, world_size: int) -> dict:
    from dwnet.engine import Trainer

    images, labels = synthetic_dataset(256)
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, rank, world_size, seed=cfg.engine.seed)
    val = TensorValLoader(images[:64], labels[:64], 32, rank, world_size)
    trainer = Trainer(cfg, rank, world_size, torch.device("cpu"), train_loader=train, val_loader=val)
    losses = []
    original = trainer.loss_fn

    def recording_loss(logits, targets):
        loss = original(logits, targets)
        losses.append(loss.item())
        return loss

    trainer.loss_fn = recording_loss
    final = trainer.fit()
    return {"losses": losses, "final": final, "skipped": trainer.guard.total_skipped}


def main(rank: int, world_size: int, port: int, out_dir: str, settings: list[list[str]]) -> None:
    set_rank_env(rank, world_size, port)
    from dwnet.distributed import init_distributed

    init_distributed()
    results = {}
    for i, overrides in enumerate(settings):
        cfg = tiny_run_config(os.path.join(out_dir, f"run{i}"), *overrides)
        results[" ".join(overrides)] = loss_curve(cfg, rank, world_size)
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as fh:
            json.dump(results, fh)
