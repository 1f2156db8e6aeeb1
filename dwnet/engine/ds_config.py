"""The DeepSpeed config a run uses, generated from the run config so the two cannot disagree."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from dwnet.config import ConfigError, EngineConfig, RunConfig, read_mapping_file
from dwnet.data.sharding import StepLayout

# Keys that the run config owns; a user DeepSpeed file may not contradict them silently.
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping", "optimizer", "scheduler")


# Settings of DeepSpeed's per-parameter ZeRO-1/2 gradient path, which the flat ZeRO step replaces.
_DEEPSPEED_STEP_ONLY = {"overlap_comm", "contiguous_gradients", "reduce_bucket_size", "reduce_scatter",
                        "round_robin_gradients"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def uses_fused_step(engine: EngineConfig, precision: str) -> bool:
    """At ZeRO 0-2 dwnet averages, clips and vetoes the gradients itself in a few multi-tensor
    operations instead of DeepSpeed's per-tensor ones (`FusedAdamW` without ZeRO, `FlatZeroStep`
    over DeepSpeed's ZeRO-1/2 partitions), and bf16 is autocast over fp32 weights (DeepSpeed's
    `torch_autocast`): no bf16 weight copies, no overflow scan, no BatchNorm parameter casts.
    ZeRO-3 and fp16 (loss scaling) stay DeepSpeed's, and `engine.fused_step=false` asks for it."""
    return engine.fused_step and engine.zero_stage <= 2 and precision in ("fp32", "bf16")


def build_deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """DeepSpeed JSON for this run in `precision`: the run's current one (`Progress.precision`),
    which a resume or the bf16 -> fp32 fallback may have changed from `engine.precision`."""
    if precision == "fp16":
        warnings.warn("fp16 with dynamic loss scaling was requested explicitly; the published DWNet base "
                      "models diverge under fp16 AMP. Prefer engine.precision=bf16 or fp32.", stacklevel=2)
    fused = uses_fused_step(cfg.engine, precision)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accumulation_steps,
        "train_batch_size": StepLayout.of(cfg, world_size).global_batch,
        # Written explicitly: DeepSpeed's default changed over releases; the recipe clips at 5.0.
        # With the fused step dwnet clips at optim.grad_clip, and DeepSpeed must not clip again.
        "gradient_clipping": 0.0 if fused else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": precision == "bf16" and not fused, "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "torch_autocast": {"enabled": precision == "bf16" and fused, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,  # our own logging; DeepSpeed's per-step print is noise
        "wall_clock_breakdown": False,
        "tensorboard": {
            "enabled": cfg.log.tensorboard,
            "output_path": os.path.join(cfg.checkpoint.dir, "tensorboard"),
            "job_name": "train",
        },
    }
    if cfg.engine.zero_stage == 3:
        # Gather whole weights into the saved model file so export works without zero_to_fp32.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole
        # process and never puts it back: TorchScript, FX and exports in the same process then fail.
        ds["zero_optimization"]["memory_efficient_linear"] = False
    if cfg.engine.deepspeed_config:
        user = read_mapping_file(cfg.engine.deepspeed_config, not_mapping="a DeepSpeed config must be a mapping",
                                 not_found="DeepSpeed config not found (engine.deepspeed_config / --deepspeed_config)")
        owned = {**ds, "gradient_clipping": cfg.optim.grad_clip}
        for key in _OWNED:
            if key in user and user[key] != owned.get(key, user[key]):
                raise ConfigError(
                    f"{cfg.engine.deepspeed_config}: '{key}'={user[key]!r} contradicts the run config "
                    f"({owned.get(key)!r}); set it through the run config (data.batch_size, "
                    "optim.accumulation_steps, optim.grad_clip) and remove it from the DeepSpeed file")
            if key in ("optimizer", "scheduler") and key in user:
                raise ConfigError(f"{cfg.engine.deepspeed_config}: '{key}' is built by dwnet-ds (AdamW + "
                                  "warmup/cosine from the optim section); remove it from the DeepSpeed file")
        merged = _deep_merge(ds, user)
        for section, key, owner in (("bf16", "enabled", "engine.precision"), ("fp16", "enabled", "engine.precision"),
                                    ("torch_autocast", "enabled", "engine.precision"),
                                    ("zero_optimization", "stage", "engine.zero_stage")):
            if merged[section][key] != ds[section][key]:
                raise ConfigError(
                    f"{cfg.engine.deepspeed_config}: '{section}.{key}'={merged[section][key]!r} contradicts "
                    f"{owner}; set {owner} instead (e.g. --opts {owner}=...)")
        ds = merged
        if fused:  # a user file repeating optim.grad_clip must not make DeepSpeed clip a second time
            ds["gradient_clipping"] = 0.0
            ignored = sorted(set(user.get("zero_optimization", {})) & _DEEPSPEED_STEP_ONLY)
            if ignored and cfg.engine.zero_stage in (1, 2):
                warnings.warn(f"{cfg.engine.deepspeed_config}: zero_optimization.{', '.join(ignored)} tune "
                              "DeepSpeed's own ZeRO step; the fused step reduces once per step and ignores them "
                              "(set engine.fused_step=false to use them)", stacklevel=2)
    return ds


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
