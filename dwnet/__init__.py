"""dwnet-ds: DWNet / dynamic DWNet models and their DeepSpeed training system.

Where things live (one home per contract):

- `errors`: `UserError`, the base of every one-line user-facing error.
- `config`: the run config (`RunConfig`, `load_config`, validation) and `read_mapping_file`, the one
  YAML/JSON reader.
- `models/`: the registered DWNet variants, `create_model` / `build_model`, checkpoint loading,
  BatchNorm fusion, FLOPs.
- `data/`: FFCV and ImageFolder loaders (`loaders`, `readers`), the .beton format (`beton_format`),
  augmentations, the world-size-independent sample order (`sharding`).
- `engine/`: the training loop. The `Trainer` (`trainer`), its step guard (`step_guard`: a
  non-finite step changes nothing, decided on the device, and the skip window decides when to roll
  back), AdamW groups and schedule (`optim`), the optimizer step in a few multi-tensor
  operations: without ZeRO (`fused_step`) and over DeepSpeed's ZeRO-1/2 partitions (`flat_zero`,
  a monkeypatch of one optimizer instance), the EMA gated on the step's verdict (`ema`), the generated DeepSpeed
  config and dtypes (`ds_config`), compiling and CUDA-graph capture (`capture`), BatchNorm
  momentum under accumulation (`bn_accumulation`), meters, evaluation (`metrics`), the run log,
  progress bar and epoch report (`run_log`), throughput.
- `distributed/`: launcher discovery (`discovery`), process group and device binding
  (`process_group`), the fail-fast exit wrapper (`failfast`), the peer watchdog (`watchdog`) and
  the check that the network interface reaches the rendezvous (`interface_probe`).
- `checkpoint/`: everything a checkpoint is, never importing `engine/`. Names of tags, pointers and
  DeepSpeed's files, the COMPLETE metadata (`TagMeta`) and sizes (`layout`, the leaf); saving,
  loading, pruning and verifying tags (`checkpointing`); the optimizer state of a ZeRO-0 tag into
  the fused step, whichever DeepSpeed optimizer wrote it (`optimizer_state`); disk space (`space`);
  resharding through DeepSpeed's universal checkpoint (`universal`); which tag to resume and how
  on this rank layout (`resume`); the run's position (`progress`); `RunCheckpointer`, handed the Trainer's states:
  save and when, restore, roll back (`run_checkpointer`); the fp32 export (`export`).
- `finite`: is a model or checkpoint finite (shared by the step guard, saves, export and eval).
- `timing`: the device clock of the package and of `bench/`.
- `preflight`: checks every rank runs before training.
- `deploy/`: ONNX and `torch.export` files.
- `fault_hooks`: faults injected by environment variables, for the launch tests (slow save, slow
  step, which host and network stack a rank runs on).

Outside the package: `train.py` (the entry point), `data_prep/` (.beton conversion), `bench/`
(benchmarks; engines built through `dwnet.engine.Trainer`), `launch/` (launcher recipes).
"""
from . import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
