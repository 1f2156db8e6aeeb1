"""Two ranks (gloo, loopback) through tests/test_checkpoint_resume.py: train one epoch under
ZeRO-2, damage one rank's optimizer shard of the newest tag, and resume on both ranks."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from engine_worker import tiny_run_config  # noqa: E402
from rank_helpers import set_rank_env  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402


def make_trainer(run_dir: str, rank: int, world_size: int):
    from dwnet.engine import Trainer

    cfg = tiny_run_config(run_dir, "optim.epochs=1", "checkpoint.every_steps=2", "engine.zero_stage=2")
    images, labels = synthetic_dataset(128)  # 4 steps per epoch on 2 ranks: tags at steps 2 and 4
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, rank, world_size, seed=cfg.engine.seed)
    val = TensorValLoader(images[:64], labels[:64], 32, rank, world_size)
    return Trainer(cfg, rank, world_size, torch.device("cpu"), train_loader=train, val_loader=val)


def main(rank: int, world_size: int, port: int, run_dir: str) -> None:
    set_rank_env(rank, world_size, port)
    import torch.distributed as dist

    from dwnet.distributed import init_distributed

    init_distributed()
    make_trainer(run_dir, rank, world_size).fit()
    dist.barrier()
    if rank == 0:  # rank 1's shard: only rank 1 reads it when loading, rank 0 must still agree
        shard = os.path.join(run_dir, "checkpoints", "step_00000004", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
        if not os.path.isfile(shard):
            shard = os.path.join(run_dir, "checkpoints", "step_00000004", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        with open(shard, "r+b") as fh:
            fh.truncate(os.path.getsize(shard) // 2)
    dist.barrier()
    resumed = make_trainer(run_dir, rank, world_size)
    with open(os.path.join(run_dir, f"resumed_rank{rank}.json"), "w") as fh:
        json.dump({"tag": resumed.resume_tag, "step": resumed.progress.step}, fh)
    dist.barrier()
