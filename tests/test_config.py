"""Configuration: published defaults, YAML + overrides, and one-line errors naming key and fix."""
import json
import math
from pathlib import Path

import pytest
import yaml

from dwnet.config import ConfigError, RunConfig, describe_schema, load_config
from dwnet.engine.ds_config import build_deepspeed_config
from dwnet.models import PUBLISHED_MODELS

# The published models' recipes are named after them.
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "ds_configs").glob("*.yaml")
                 if p.stem in PUBLISHED_MODELS)


def test_defaults_are_the_published_recipe():
    cfg = RunConfig()
    assert (cfg.optim.base_lr, cfg.optim.warmup_lr, cfg.optim.min_lr) == (5e-4, 5e-7, 5e-6)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.weight_decay) == (300, 20, 0.05)
    assert cfg.optim.grad_clip == 5.0 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.eps == 1e-8
    assert (cfg.augment.mixup, cfg.augment.cutmix, cfg.augment.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert cfg.augment.label_smoothing == 0.1 and cfg.augment.random_erasing == 0.25
    assert cfg.augment.rand_augment == "rand-m9-mstd0.5-inc1" and cfg.data.crop_pct == 0.875
    assert cfg.engine.precision in ("fp32", "bf16")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: dwnet_nano\noptim:\n  base_lr: 1e-3\n  epochs: 30\n")
    cfg = load_config(path, ["optim.epochs=10", "optim.warmup_epochs=1", "augment.scale=[0.2, 1]", "model.drop_path_rate=null"])
    assert cfg.model.name == "dwnet_nano" and cfg.optim.base_lr == 1e-3 and cfg.optim.epochs == 10
    assert cfg.augment.scale == (0.2, 1.0) and cfg.model.drop_path_rate is None


@pytest.mark.parametrize("overrides, message", [
    (["optim.epochz=3"], "--opts: unknown key 'optim.epochz'; did you mean 'optim.epochs'?"),
    (["optim.epochs=ten"], "--opts: optim.epochs must be int, got 'ten' (str); write e.g. optim.epochs=8"),
    (["engine.precision=fp8"], "engine.precision='fp8' is not one of fp32, bf16, fp16"),
    (["engine.zero_stage=4"], "engine.zero_stage=4 is not one of 0, 1, 2, 3"),
    (["engine.zero_stage=3", "engine.ema=true"], "engine.ema=true needs whole parameters"),
    (["engine.zero_stage=3", "model.sync_bn=true"], "model.sync_bn=true is not supported with ZeRO-3"),
    (["augment.scale=0.3"], "--opts: augment.scale must be a list of 2 numbers, got 0.3"),
    (["data.batch_size=0"], "data.batch_size=0 must be > 0"),
    (["optim.warmup_epochs=400"], "optim.warmup_epochs=400.0 must be < optim.epochs=300; lower optim.warmup_epochs"),
    (["augment.hflip=1.5"], "augment.hflip=1.5 must be a probability in [0, 1]"),
    (["optim"], "--opts 'optim': write overrides as section.key=value"),
    (["model=3"], "--opts: 'model' is a section; give it a mapping of keys, not 3"),
    # values, not only types (issue 13): each of these used to crash after start-up or train silently
    (["model.num_classes=0"], "model.num_classes=0 must be > 0"),
    (["optim.base_lr=nan"], "optim.base_lr=nan must be a finite number"),
    (["optim.base_lr=.inf"], "optim.base_lr=inf must be a finite number"),
    (["optim.base_lr=0"], "optim.base_lr=0.0 must be > 0"),
    (["optim.min_lr=0.01"], "optim.min_lr=0.01 is above optim.base_lr=0.0005 (the peak LR)"),
    (["augment.mixup=-1"], "augment.mixup=-1.0 must be >= 0 (0 disables it)"),
    (["augment.cutmix=-0.5"], "augment.cutmix=-0.5 must be >= 0 (0 disables it)"),
    (["augment.scale=[1.0, 0.08]"], "augment.scale=[1.0, 0.08] must be a range [low, high] with 0 < low <= high "
                                    "<= 1, e.g. [0.08, 1.0]; swap them: [0.08, 1]"),
    (["augment.scale=[0, 1]"], "augment.scale=[0.0, 1.0] must be a range [low, high] with 0 < low <= high <= 1"),
    (["augment.ratio=[1.33, 0.75]"], "augment.ratio=[1.33, 0.75] must be a range [low, high] with 0 < low <= high"),
    (["augment.random_erasing=2"], "augment.random_erasing=2.0 must be a probability in [0, 1]"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 must be in [0, 1)"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas=[0.9, 1.0] must both be in [0, 1)"),
    (["engine.seed=-1"], "engine.seed=-1 must be >= 0"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_yaml_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_config_is_derived_and_clipping_always_explicit():
    cfg = load_config(None, ["data.batch_size=64", "optim.accumulation_steps=2", "engine.zero_stage=2",
                             "engine.precision=bf16", "optim.grad_clip=5.0"])
    ds = build_deepspeed_config(cfg, world_size=16, precision=cfg.engine.precision)
    assert ds["train_batch_size"] == 64 * 2 * 16 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    # The fused step clips (at optim.grad_clip) and autocasts; DeepSpeed must do neither on its own.
    assert ds["gradient_clipping"] == 0.0 and not ds["bf16"]["enabled"] and ds["torch_autocast"]["enabled"]
    assert not ds["fp16"]["enabled"]
    assert build_deepspeed_config(cfg, 16, precision="fp32")["torch_autocast"]["enabled"] is False
    for own_step in (["engine.fused_step=false"], ["engine.zero_stage=3"]):  # DeepSpeed's step: it clips
        cfg = load_config(None, ["engine.zero_stage=2", "engine.precision=bf16", "optim.grad_clip=5.0", *own_step])
        ds = build_deepspeed_config(cfg, world_size=16, precision=cfg.engine.precision)
        assert ds["gradient_clipping"] == 5.0 and ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]


def test_fp16_only_on_request_and_with_a_warning():
    assert not build_deepspeed_config(RunConfig(), 1, "fp32")["fp16"]["enabled"]
    cfg = load_config(None, ["engine.precision=fp16"])
    with pytest.warns(UserWarning, match="diverge under fp16"):
        assert build_deepspeed_config(cfg, 1, cfg.engine.precision)["fp16"]["enabled"]


def test_user_deepspeed_file_merges_but_cannot_contradict(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    cfg = load_config(None, [f"engine.deepspeed_config={extra}", "engine.zero_stage=2", "engine.fused_step=false"])
    ds = build_deepspeed_config(cfg, 1, cfg.engine.precision)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["gradient_clipping"] == 5.0
    cfg.engine.fused_step = True  # the flat ZeRO step has no overlap to tune: it says so
    with pytest.warns(UserWarning, match=r"zero_optimization.overlap_comm tune DeepSpeed's own ZeRO step.*"
                                         r"engine.fused_step=false"):
        assert build_deepspeed_config(cfg, 1, cfg.engine.precision)["gradient_clipping"] == 0.0

    extra.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="'gradient_clipping'=1.0 contradicts the run config"):
        build_deepspeed_config(cfg, 1, cfg.engine.precision)
    extra.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="'bf16.enabled'=True contradicts engine.precision"):
        build_deepspeed_config(cfg, 1, cfg.engine.precision)
    extra.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' is built by dwnet-ds"):
        build_deepspeed_config(cfg, 1, cfg.engine.precision)


def test_schema_reference_has_one_row_per_key_with_its_default_and_a_meaning():
    rows = {}
    for line in describe_schema().splitlines()[2:]:
        key, default, meaning = (cell.strip() for cell in line.strip("|").split("|"))
        assert key not in rows, f"{key} listed twice"
        rows[key] = (default.strip("`"), meaning)
    flat = {f"`{s}.{k}`": v for s, values in RunConfig().to_dict().items() for k, v in values.items()}
    assert set(rows) == set(flat)
    for key, value in flat.items():
        shown, meaning = rows[key]
        assert meaning, f"{key} has no help text"
        parsed = yaml.safe_load(shown)  # what a user copying the default into a config would get
        expected = list(value) if isinstance(value, tuple) else value
        if isinstance(expected, list):
            assert parsed == pytest.approx(expected, rel=1e-5), key
        elif isinstance(expected, float):
            assert math.isclose(float(parsed), expected), key
        else:
            assert parsed == expected, key


def test_every_published_model_has_a_recipe():
    assert sorted(p.stem for p in RECIPES) == sorted(PUBLISHED_MODELS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    cfg = load_config(path)
    base = "base" in path.stem
    assert cfg.data.batch_size == (64 if base else 128)
    assert cfg.engine.precision == ("fp32" if base else "bf16")


def test_readme_configuration_reference_matches_the_schema():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe_schema() in readme, "README is stale: paste the output of `python -m dwnet.config`"
