"""Run configuration: typed sections with the published recipe as defaults, loaded from YAML and
`--opts section.key=value` overrides, validated before any work starts.

Every error is one line naming the key and the fix; `describe_schema()` renders the reference
table the README shows, so documentation and code cannot drift.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from dwnet.errors import UserError

# The closed choices of the schema: `validate` checks values against them (CHOICES).
Backend = Literal["ffcv", "imagefolder"]
MixupMode = Literal["batch", "pair", "elem"]
Precision = Literal["fp32", "bf16", "fp16"]
ZeroStage = Literal[0, 1, 2, 3]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]


class ConfigError(UserError, ValueError):
    """A configuration that cannot run: the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = field(default="dwnet_tiny", metadata={"help": "registered model (timm registry)"})
    num_classes: int = field(default=1000, metadata={"help": "classifier outputs"})
    drop_path_rate: float | None = field(default=None, metadata={"help": "stochastic depth; null = the model's published rate"})
    pretrained: str | None = field(default=None, metadata={"help": "initial weights: official .pth or exported file (fine-tuning)"})
    pretrained_strict: bool = field(default=True, metadata={"help": "false: load a backbone whose head does not match num_classes"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing per block"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across ranks (small per-rank batches)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    compile_mode: CompileMode = field(default="default", metadata={
        "help": "with model.compile: reduce-overhead also captures forward and backward in CUDA graphs"})


@dataclass
class DataConfig:
    backend: Backend = field(default="ffcv", metadata={"help": "ffcv (.beton files) or imagefolder (torchvision, for comparison)"})
    train_path: str = field(default="", metadata={"help": "train .beton (ffcv) or ImageFolder directory"})
    val_path: str = field(default="", metadata={"help": "val .beton (ffcv) or ImageFolder directory"})
    image_size: int = field(default=224, metadata={"help": "train/eval resolution"})
    crop_pct: float = field(default=0.875, metadata={"help": "eval center-crop ratio (224/256)"})
    batch_size: int = field(default=128, metadata={"help": "images per rank per micro-step"})
    num_workers: int = field(default=8, metadata={"help": "decode workers per rank"})
    os_cache: bool = field(default=True, metadata={"help": "ffcv: let the OS page cache hold the .beton"})
    batches_ahead: int = field(default=3, metadata={"help": "ffcv: batches prefetched"})


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"})
    ratio: tuple[float, float] = field(default=(0.75, 4 / 3), metadata={"help": "RandomResizedCrop aspect range"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    rand_augment: str = field(default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment spec; empty disables"})
    random_erasing: float = field(default=0.25, metadata={"help": "random erasing probability (pixel mode)"})
    mixup: float = field(default=0.8, metadata={"help": "mixup alpha; 0 disables"})
    cutmix: float = field(default=1.0, metadata={"help": "cutmix alpha; 0 disables"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix when both are on"})
    mixup_mode: MixupMode = field(default="batch", metadata={"help": "batch, pair or elem"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})


@dataclass
class OptimConfig:
    epochs: int = field(default=300, metadata={"help": "training epochs"})
    warmup_epochs: float = field(default=20, metadata={"help": "linear warmup epochs"})
    base_lr: float = field(default=5e-4, metadata={"help": "peak LR at lr_reference_batch images per step"})
    warmup_lr: float = field(default=5e-7, metadata={"help": "LR at step 0 (scaled like base_lr)"})
    min_lr: float = field(default=5e-6, metadata={"help": "cosine floor (scaled like base_lr)"})
    lr_reference_batch: int = field(default=512, metadata={"help": "LRs scale linearly by global batch / this"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decay (not on norms, biases, 1-D params)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW eps"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient-norm clipping (always written to DeepSpeed)"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})


@dataclass
class EngineConfig:
    precision: Precision = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (fp16 only on request: the base models diverge)"})
    zero_stage: ZeroStage = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    seed: int = field(default=0, metadata={"help": "global seed (data order, init, augmentation)"})
    deepspeed_config: str | None = field(default=None, metadata={"help": "extra DeepSpeed JSON/YAML merged over the generated one"})
    ema: bool = field(default=False, metadata={"help": "timm ModelEmaV3 of the weights (ZeRO 0-2)"})
    ema_decay: float = field(default=0.9998, metadata={"help": "EMA decay per optimizer step"})
    nonfinite_max_skips: int = field(default=5, metadata={"help": "skipped non-finite steps within the window that trigger a rollback"})
    nonfinite_window: int = field(default=200, metadata={"help": "optimizer steps the skip count looks back over"})
    fused_step: bool = field(default=True, metadata={"help": "ZeRO 0-2, fp32/bf16: average, clip and veto the "
                                                     "gradients in a few multi-tensor operations (false: DeepSpeed's own per-tensor path)"})


@dataclass
class CheckpointConfig:
    dir: str = field(default="runs/default", metadata={"help": "run directory: checkpoints, logs, exported model"})
    every_steps: int = field(default=1000, metadata={"help": "save every N optimizer steps (0: only at epoch end)"})
    keep_last: int = field(default=2, metadata={"help": "recent checkpoints kept (the best one is kept too)"})
    auto_resume: bool = field(default=True, metadata={"help": "continue from the newest complete checkpoint in dir"})


@dataclass
class LogConfig:
    every_steps: int = field(default=20, metadata={"help": "TensorBoard / console logging interval"})
    tensorboard: bool = field(default=True, metadata={"help": "DeepSpeed monitor to TensorBoard under <dir>/tensorboard"})
    progress: bool = field(default=True, metadata={"help": "progress bar on rank 0"})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choices() -> dict[str, tuple]:
    """Every `Literal` field of the schema: its key and allowed values."""
    choices = {}
    for section, cls in typing.get_type_hints(RunConfig).items():
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is Literal:
                choices[f"{section}.{name}"] = typing.get_args(hint)
    return choices


CHOICES = _choices()


# ---- loading --------------------------------------------------------------------------------
def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Checks/converts one value against its field type; raises a one-line ConfigError."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if hint is Literal:  # the type of its values here; which value, in `validate`
        return _coerce(key, value, type(args[0]), source)
    if hint in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner, source)
    if hint is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(key, v, a, source) for v, a in zip(value, args))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads '5e-4' (no dot) as a string; accept it as the number it obviously is.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and value is None:
        return ""
    if annotation in (int, float, str, bool) and type(value) is not annotation:
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got {value!r} "
                          f"({type(value).__name__}); write e.g. {key}={_example(annotation)}")
    return value


def _example(annotation: type) -> str:
    return {int: "8", float: "0.001", str: "name", bool: "true"}[annotation]


def _apply(cfg: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{key}'; {fix}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' is a section; give it a mapping of keys, not {value!r}")
            _apply(current, value, f"{key}.", source)
        else:
            setattr(cfg, name, _coerce(key, value, hints[name], source))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['optim.epochs=10', 'data.batch_size=64'] -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--opts {item!r}: write overrides as section.key=value, e.g. optim.epochs=10")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def read_mapping_file(path: str | os.PathLike, *, not_found: str, not_mapping: str,
                      empty_is_mapping: bool = False) -> dict[str, Any]:
    """Reads a YAML file (JSON when the name ends in .json) whose top level is a mapping.

    Every failure is a one-line ConfigError starting with the path: `not_found` / `not_mapping`
    say what the file is and how to fix it; a parse error names the line. `empty_is_mapping`
    reads an empty file as {}.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {not_found}")
    is_json = str(path).endswith(".json")
    with open(path) as fh:
        try:
            values = json.load(fh) if is_json else yaml.safe_load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {err.lineno} invalid JSON ({err.msg})") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from err
    if empty_is_mapping:
        values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {not_mapping}")
    return values


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults (published recipe) <- YAML file <- overrides; then validate()."""
    cfg = RunConfig()
    if path:
        values = read_mapping_file(path, not_found="config file not found; see ds_configs/ for examples",
                                   not_mapping="top level must be a mapping of sections (model:, data:, ...)",
                                   empty_is_mapping=True)
        _apply(cfg, values, "", str(path))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "--opts")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Rejects impossible combinations and values before any process group, data or model is built."""
    flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(map(str, allowed))}")
    _check_finite(flat)
    positive = ["model.num_classes", "data.image_size", "data.batch_size", "data.batches_ahead", "optim.epochs",
                "optim.accumulation_steps", "optim.lr_reference_batch", "optim.base_lr", "optim.eps",
                "checkpoint.keep_last", "log.every_steps", "engine.nonfinite_window", "engine.nonfinite_max_skips"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be > 0")
    non_negative = ["optim.grad_clip", "optim.warmup_lr", "optim.min_lr", "optim.weight_decay", "data.num_workers",
                    "checkpoint.every_steps", "optim.warmup_epochs", "engine.seed", "augment.mixup", "augment.cutmix"]
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be >= 0" + (" (0 disables it)" if key.startswith("augment")
                                                                   else ""))
    for key in ("optim.warmup_lr", "optim.min_lr"):
        if flat[key] > cfg.optim.base_lr:
            raise ConfigError(f"{key}={flat[key]} is above optim.base_lr={cfg.optim.base_lr} (the peak LR); "
                              f"lower {key} or raise optim.base_lr")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs and cfg.optim.epochs > 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be < optim.epochs={cfg.optim.epochs}; "
                          "lower optim.warmup_epochs")
    if not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct={cfg.data.crop_pct} must be in (0, 1]; 0.875 is 224/256")
    for key in ("augment.hflip", "augment.random_erasing", "augment.mixup_switch_prob", "augment.label_smoothing"):
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"{key}={flat[key]} must be a probability in [0, 1]")
    if cfg.model.drop_path_rate is not None and not 0 <= cfg.model.drop_path_rate < 1:
        raise ConfigError(f"model.drop_path_rate={cfg.model.drop_path_rate} must be in [0, 1) (null: the model's own)")
    if not all(0 <= beta < 1 for beta in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must both be in [0, 1), e.g. [0.9, 0.999]")
    _check_range("augment.scale", cfg.augment.scale, upper=1.0, example="[0.08, 1.0]")
    _check_range("augment.ratio", cfg.augment.ratio, upper=None, example="[0.75, 1.333]")
    if cfg.engine.ema and cfg.engine.zero_stage == 3:
        raise ConfigError("engine.ema=true needs whole parameters on every rank, which ZeRO-3 partitions; "
                          "use engine.zero_stage<=2 or engine.ema=false")
    if not 0 < cfg.engine.ema_decay < 1:
        raise ConfigError(f"engine.ema_decay={cfg.engine.ema_decay} must be in (0, 1)")
    if cfg.model.sync_bn and cfg.engine.zero_stage == 3:
        raise ConfigError("model.sync_bn=true is not supported with ZeRO-3 (partitioned BN parameters); "
                          "use engine.zero_stage<=2")


def _check_finite(flat: dict[str, Any]) -> None:
    """nan/inf pass every `<`/`>` test (nan) or break the schedule later (inf): no key accepts them."""
    for key, value in flat.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            raise ConfigError(f"{key}={value} must be a finite number")


def _check_range(key: str, bounds: tuple[float, float], upper: float | None, example: str) -> None:
    """A (low, high) range: positive, ordered low <= high, and at most `upper`."""
    low, high = bounds
    limit = f"0 < low <= high <= {upper:g}" if upper is not None else "0 < low <= high"
    if not (0 < low <= high and (upper is None or high <= upper)):
        fix = f"; swap them: [{high:g}, {low:g}]" if 0 < high <= low and (upper is None or low <= upper) else ""
        raise ConfigError(f"{key}={[low, high]} must be a range [low, high] with {limit}, e.g. {example}{fix}")


def describe_schema() -> str:
    """Markdown table of every key, its default and its meaning (rendered into the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(RunConfig):
        defaults = section.default_factory()
        for f in dataclasses.fields(defaults):
            default = getattr(defaults, f.name)
            shown = "null" if default is None else (f'"{default}"' if isinstance(default, str) else default)
            if isinstance(default, tuple):
                shown = "[" + ", ".join(f"{x:g}" for x in default) + "]"
            rows.append(f"| `{section.name}.{f.name}` | `{shown}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m dwnet.config: the configuration reference (README section)
    print(describe_schema())
