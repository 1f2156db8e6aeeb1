"""dwnet-ds: DWNet / dynamic DWNet models and their DeepSpeed training system.

Where things live (one home per contract):

- `errors`: `UserError`, the base of every one-line user-facing error.
- `config`: the run config (`RunConfig`, `load_config`, validation) and `read_mapping_file`, the one
  YAML/JSON reader.
- `models/`: the registered DWNet variants, `create_model` / `build_model`, checkpoint loading,
  BatchNorm fusion, FLOPs.
- `data/`: FFCV and ImageFolder loaders (`loaders`, `readers`), the .beton format (`beton_format`),
  augmentations, the world-size-independent sample order (`sharding`).
- `engine/`: the generated DeepSpeed config and dtypes (`ds_config`), AdamW groups and schedule
  (`optim`), the `Trainer` loop (`trainer`) and its meters, the run's position (`progress`), saving,
  restoring and rolling back (`run_state`), which tag to resume and how on this rank layout
  (`resume`), resharding through DeepSpeed's universal checkpoint (`universal`), checkpoint files
  (`checkpointing`, `checkpoint_space`), non-finite guards, throughput and its timing, export.
- `distributed/`: launcher discovery (`discovery`), process group and device binding
  (`process_group`), the fail-fast exit wrapper (`failfast`).
- `preflight`: checks every rank runs before training.
- `deploy/`: ONNX and `torch.export` files.

Outside the package: `train.py` (the entry point), `data_prep/` (.beton conversion), `bench/`
(benchmarks; engines built through `dwnet.engine.Trainer`), `launch/` (launcher recipes).
"""
from . import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
