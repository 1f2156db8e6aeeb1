#!/usr/bin/env python
"""dwnet-ds: the one entry point. Train (auto-resuming), evaluate, measure throughput, export.

    deepspeed --num_gpus 8 train.py --config ds_configs/dwnet_tiny.yaml      # train / resume
    python train.py --config ds_configs/dwnet_tiny.yaml --eval --resume dwnet_tiny_224.pth
    python train.py --config ds_configs/dwnet_tiny.yaml --throughput
    python train.py --config ds_configs/dwnet_tiny.yaml --export runs/dwnet_tiny/dwnet_tiny_fp32.pth

Any launcher works (deepspeed/pdsh, deepspeed --launcher openmpi, mpirun, torchrun, srun):
rank, world size and local rank are read from its environment.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (ds_configs/*.yaml); defaults are the published recipe")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. --opts optim.epochs=10 data.batch_size=64")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="extra DeepSpeed JSON/YAML merged over the generated config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true", help="top-1/top-5/loss on data.val_path, then exit")
    mode.add_argument("--throughput", action="store_true", help="images/s of forward and forward+backward")
    mode.add_argument("--export", metavar="OUT.pth", help="write consolidated fp32 weights in the official format")
    parser.add_argument("--resume", metavar="PATH",
                        help="--eval: official/exported .pth or a run directory (default: checkpoint.dir)")
    parser.add_argument("--checkpoint-tag", default="best", help="--eval/--export from a run: best, latest or a tag")
    parser.add_argument("--switch-precision", action="store_true",
                        help="resume an fp32 checkpoint in a lower engine.precision (bf16/fp16); without it a "
                             "resume keeps fp32, which may be a non-finite fallback's decision")
    parser.add_argument("--new-global-batch", action="store_true",
                        help="resume with the global batch this launch's config gives (LR rescaled) when the "
                             "checkpoint's cannot be kept on this number of ranks")
    parser.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=True,
                        help="check files, writability and versions on every rank before training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dwnet.config import load_config

    overrides = list(args.opts)
    if args.deepspeed_config:
        overrides.append(f"engine.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)  # fails before any process group exists
    if args.export:
        return export(cfg, args)

    from dwnet.distributed import init_distributed, training_device

    env = init_distributed()
    from dwnet.distributed.watchdog import start_peer_watchdog
    from dwnet.fault_hooks import apply_fault_hooks

    # before the first collective of the run: a lost host ends every rank within DWNET_PEER_TIMEOUT
    start_peer_watchdog(env, run_dir=cfg.checkpoint.dir)
    apply_fault_hooks(env.rank)
    device = training_device()
    if args.throughput:
        return throughput(cfg, device, env.rank)
    if args.eval:
        if args.preflight:
            from dwnet.preflight import preflight_betons, run_preflight

            run_preflight(required_files=[cfg.data.val_path], writable_dirs=[],
                          beton_files=preflight_betons(cfg, splits=("val",)))
        return evaluate(cfg, args, env, device)
    if args.preflight:
        from dwnet.preflight import preflight_betons, run_preflight

        required = [p for p in (cfg.data.train_path, cfg.data.val_path) if p]
        from dwnet.checkpoint.space import space_for_two_tags

        space = space_for_two_tags(cfg)
        run_preflight(required_files=required, writable_dirs=[cfg.checkpoint.dir], beton_files=preflight_betons(cfg),
                      space_needed={cfg.checkpoint.dir: space} if space else None)
    from dwnet.engine import Trainer, TrainingDiverged

    trainer = Trainer(cfg, env.rank, env.world_size, device, switch_precision=args.switch_precision,
                      new_global_batch=args.new_global_batch)
    if trainer.finished:
        if env.rank == 0:
            print(trainer.finished_message(), flush=True)
        return 0
    try:
        final = trainer.fit()
    except TrainingDiverged as err:
        stop_in_one_line(f"training stopped: {err}", env)
    if env.rank == 0 and final:
        print(json.dumps({"final": final}))
    return 0


def stop_in_one_line(message: str, env) -> None:
    """Every rank reached the same decision at the same step: rank 0 says it once (and the others
    wait for that, so that a launcher tearing the job down cannot cut it off), all exit 1."""
    import torch.distributed as dist

    if env.rank == 0:
        print(message, file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()
    raise SystemExit(1)


def export(cfg, args: argparse.Namespace) -> int:
    from dwnet.checkpoint.layout import checkpoint_root
    from dwnet.checkpoint.export import export_official, resolve_tag
    from dwnet.finite import NonFiniteModelError

    tag = resolve_tag(cfg.checkpoint.dir, args.checkpoint_tag)
    try:
        out = export_official(checkpoint_root(cfg.checkpoint.dir), tag, args.export, extra={"arch": cfg.model.name})
    except NonFiniteModelError as err:
        raise SystemExit(f"export refused: {err}") from None
    print(f"exported {cfg.checkpoint.dir} [{tag}] -> {out}")
    return 0


def evaluate(cfg, args: argparse.Namespace, env, device) -> int:
    """Plain model (no optimizer, no ZeRO), each rank on its val shard, sums all-reduced."""
    import torch

    from dwnet.data import build_val_loader
    from dwnet.models import build_model
    from dwnet.checkpoint.layout import checkpoint_root
    from dwnet.checkpoint.export import consolidated_state_dict, resolve_tag
    from dwnet.finite import NonFiniteModelError, check_state_dict
    from dwnet.engine.metrics import evaluate as run_eval
    from dwnet.models import load_checkpoint, load_state_dict_checked

    if not cfg.data.val_path:
        raise SystemExit("data.val_path is empty; set it to the val .beton (--opts data.val_path=...)")
    source = args.resume or cfg.checkpoint.dir
    cfg.model.pretrained = None
    model = build_model(cfg)
    if os.path.isdir(source):  # a run directory: the same consolidated fp32 weights --export writes
        run_dir = source
        tag = resolve_tag(run_dir, args.checkpoint_tag)
        source = f"{run_dir} [{tag}]"
        load_state_dict_checked(model, consolidated_state_dict(checkpoint_root(run_dir), tag), source, strict=True)
    else:
        load_checkpoint(model, source, strict=True)
    try:  # every rank loaded the same file: each reaches the same verdict without a collective
        check_state_dict(model.state_dict(), source, fix="evaluate an earlier checkpoint (--checkpoint-tag step_N)")
    except NonFiniteModelError as err:
        stop_in_one_line(f"eval refused: {err}", env)
    model = model.to(device).eval()
    loader = build_val_loader(cfg.data, rank=env.rank, world_size=env.world_size, device=device,
                              channels_last=cfg.model.channels_last)
    results = run_eval(model, loader, device, torch.float32)
    finite = all(math.isfinite(results[k]) for k in ("top1", "top5", "loss"))
    if env.rank == 0:
        print(f"eval {source} on {cfg.data.val_path}: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  "
              f"loss {results['loss']:.4f}  ({results['samples']} images)")
        print(json.dumps({"eval": results}))
        if not finite:
            print(f"eval {source}: the loss is not finite (finite weights, overflowing activations); "
                  "these figures are not a valid result", file=sys.stderr)
    return 0 if finite else 1


def throughput(cfg, device, rank: int) -> int:
    import torch

    from dwnet.models import build_model
    from dwnet.engine.throughput import measure_throughput
    from dwnet.engine.ds_config import DTYPES

    cfg.model.pretrained = None
    model = build_model(cfg)
    results = measure_throughput(model, cfg.data.batch_size, cfg.data.image_size, device,
                                 dtype=DTYPES[cfg.engine.precision], channels_last=cfg.model.channels_last)
    if rank == 0:
        print(f"{cfg.model.name} @ {cfg.data.image_size}px, batch {cfg.data.batch_size}, {cfg.engine.precision}, "
              f"{device}, {torch.get_num_threads()} threads: " +
              ", ".join(f"{k} {v:.1f} img/s" for k, v in results.items()))
        print(json.dumps({"throughput": results}))
    return 0


if __name__ == "__main__":
    from dwnet.distributed import exit_now, run_and_exit_on_failure

    exit_now(run_and_exit_on_failure(main))
