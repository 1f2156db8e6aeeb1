"""Tags written by DeepSpeed's own step resume into the fused step with their whole state.

DeepSpeed's path is `engine.fused_step=false`, and what every dwnet up to 8f48e96 ran: at ZeRO-0,
bf16 in DeepSpeed's low-precision wrapper (bf16 weights; fp32 master copies and the AdamW moments in
the wrapper's own state dict) and fp32 in a DeepSpeed-held torch AdamW; at ZeRO-1/2 DeepSpeed's ZeRO
optimizer over bf16 or fp32 weights with an unfused AdamW inside. The tags are written here by the
current Trainer with `engine.fused_step=false`, so DeepSpeed itself writes the format; the tests
assert the format before resuming it.

Before the fix, the bf16 ZeRO-0 tag failed to load (KeyError: 'param_groups') and the fp32 one
loaded but failed at its first step (the saved `fused: None` switched the fused kernel off).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import engine_worker  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402

from dwnet.checkpoint import layout  # noqa: E402
from dwnet.checkpoint.export import consolidated_state_dict, read_client_state  # noqa: E402
from dwnet.checkpoint.optimizer_state import OptimizerStateError  # noqa: E402
from dwnet.engine import Trainer  # noqa: E402
from dwnet.engine.flat_zero import FlatZeroStep  # noqa: E402
from dwnet.engine.fused_step import FusedAdamW  # noqa: E402

SETTINGS = ("optim.epochs=2", "engine.ema=true", "engine.ema_decay=0.9", "optim.warmup_epochs=0.5")


def make_trainer(run_dir, precision: str, stage: int = 0, *extra: str) -> Trainer:
    cfg = engine_worker.tiny_run_config(str(run_dir), *SETTINGS, f"engine.precision={precision}",
                                        f"engine.zero_stage={stage}", "checkpoint.every_steps=5",
                                        "checkpoint.keep_last=10", *extra)
    images, labels = synthetic_dataset(128)  # 8 steps per epoch
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, seed=cfg.engine.seed)
    val = TensorValLoader(images[:64], labels[:64], 32)
    return Trainer(cfg, 0, 1, torch.device("cpu"), train_loader=train, val_loader=val)


def old_run(run_dir, precision: str, stage: int = 0) -> dict:
    """Two epochs and a tag at step 5 through DeepSpeed's own step; the states of the step-5 tag."""
    old = make_trainer(run_dir, precision, stage, "engine.fused_step=false")
    assert old.fused_step is None
    old.fit()
    assert old.progress.epoch == 2
    root = layout.checkpoint_root(str(run_dir))
    for later in os.listdir(root):  # relaunch on the step-5 tag: mid-epoch, past the warmup
        if layout.is_tag_name(later) and later > "step_00000005":
            shutil.rmtree(os.path.join(root, later))
    return read_client_state(root, "step_00000005")


def assert_carried_over(new: Trainer, masters: list[torch.Tensor], inner: dict, saved: dict) -> None:
    params = [p for group in new.optimizer.param_groups for p in group["params"]]
    assert len(params) == len(masters)
    for p, master in zip(params, masters, strict=True):
        torch.testing.assert_close(p.detach(), master, atol=0, rtol=0)  # the fp32 masters, not bf16 copies
    for i, p in enumerate(params):
        state, old = new.optimizer.state[p], inner["state"][i]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state[key].cpu(), old[key], atol=0, rtol=0, msg=key)
    assert all(group["fused"] is True for group in new.optimizer.param_groups)
    assert (new.progress.step, new.progress.epoch, new.progress.step_in_epoch) == (5, 0, 5)
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(
        new.scheduler._get_lr(5)[0])  # the schedule at step 5, not at its start
    for name, value in new.ema.module.state_dict().items():
        torch.testing.assert_close(value, saved["ema"][name].to(value.dtype), atol=0, rtol=0, msg=name)
    buffers = dict(new.engine.module.named_buffers())
    for name, value in saved["buffers"].items():  # BatchNorm statistics
        torch.testing.assert_close(buffers[name], value, atol=0, rtol=0, msg=name)


def test_old_bf16_zero0_tag_resumes_into_the_fused_step(tmp_path, process_group):
    saved = old_run(tmp_path, "bf16")
    wrapper = saved["optimizer"]
    assert {"optimizer_state_dict", "fp32_groups"} <= set(wrapper)  # DeepSpeed's bf16 wrapper format
    assert next(iter(saved["module"].values())).dtype == torch.bfloat16
    masters = [t for group in wrapper["fp32_groups"] for t in group]

    new = make_trainer(tmp_path, "bf16")
    assert new.resume_tag == "step_00000005" and isinstance(new.optimizer, FusedAdamW)
    assert new.progress.precision == "bf16"
    assert_carried_over(new, masters, wrapper["optimizer_state_dict"], saved)
    final = new.fit()  # continues: 11 more steps, then a new-format tag that resumes again
    assert new.progress.step == 16 and final["train_loss"] < 2.0
    again = make_trainer(tmp_path, "bf16")
    assert again.finished and again.progress.step == 16


def test_old_fp32_zero0_tag_resumes_into_the_fused_step(tmp_path, process_group):
    saved = old_run(tmp_path, "fp32")
    inner = saved["optimizer"]
    assert {"state", "param_groups"} <= set(inner) and inner["param_groups"][0]["fused"] is None

    new = make_trainer(tmp_path, "fp32")
    names = {id(p): n for n, p in new.engine.module.named_parameters()}  # fp32: the module holds the weights
    masters = [saved["module"][names[id(p)]] for group in new.optimizer.param_groups for p in group["params"]]
    assert_carried_over(new, masters, inner, saved)
    new.fit()  # the first step used to fail: "Expected grad_scale and found_inf to be None"
    assert new.progress.step == 16


def test_unreadable_optimizer_state_stops_in_one_line(tmp_path, process_group):
    old_run(tmp_path, "bf16")
    path = os.path.join(layout.checkpoint_root(str(tmp_path)), "step_00000005", layout.MODEL_STATES_FILES[0])
    states = torch.load(path, weights_only=False)
    states["optimizer"] = {"base_optimizer_state": {}, "single_partition_of_fp32_groups": []}
    torch.save(states, path)
    with pytest.raises(OptimizerStateError) as err:
        make_trainer(tmp_path, "bf16")
    message = str(err.value)
    assert "\n" not in message and os.path.dirname(path) in message and "engine.precision=fp32" in message


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16")])
def test_zero_tag_of_deepspeeds_path_resumes_into_the_flat_step(tmp_path, process_group, stage, precision):
    """DeepSpeed's ZeRO optimizer loads its own state into the flat step's engine: the fp32 master
    partitions become the (fp32, autocast) weights, the inner AdamW's moments and step counts carry
    over with the fused kernel kept on, and training goes on."""
    saved = old_run(tmp_path, precision, stage)
    assert next(iter(saved["module"].values())).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    tag = os.path.join(layout.checkpoint_root(str(tmp_path)), "step_00000005")
    (shard,) = glob.glob(os.path.join(tag, layout.OPTIM_STATES_GLOB))
    zero_state = torch.load(shard, weights_only=False)["optimizer_state_dict"]
    inner = zero_state["base_optimizer_state"]
    assert inner["param_groups"][0]["fused"] is None  # DeepSpeed's path: the unfused GuardedAdamW
    master_weights = consolidated_state_dict(layout.checkpoint_root(str(tmp_path)), "step_00000005")

    new = make_trainer(tmp_path, precision, stage)
    assert new.resume_tag == "step_00000005" and isinstance(new.fused_step, FlatZeroStep)
    zero = new.engine.optimizer
    for mine, old in zip(zero.single_partition_of_fp32_groups, zero_state["single_partition_of_fp32_groups"],
                         strict=True):
        torch.testing.assert_close(mine.detach(), old, atol=0, rtol=0)
    for name, value in new.engine.module.named_parameters():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.detach(), master_weights[name], atol=0, rtol=0, msg=name)
    base = zero.optimizer
    assert all(group["fused"] is True for group in base.param_groups)
    for i, group in enumerate(base.param_groups):
        state, old = base.state[group["params"][0]], inner["state"][i]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state[key].cpu(), old[key], atol=0, rtol=0, msg=key)
    assert (new.progress.step, new.progress.step_in_epoch) == (5, 5)
    final = new.fit()
    assert new.progress.step == 16 and final["train_loss"] < 2.0


def test_a_flat_step_tag_resumes_into_deepspeeds_own_zero_step(tmp_path, process_group):
    """The other way round (`engine.fused_step=false` on a run of the fused step): DeepSpeed's bf16
    engine finds the shards under the names the autocast engine gave them and continues from the
    same fp32 masters and moments."""
    first = make_trainer(tmp_path, "bf16", 2)
    assert isinstance(first.fused_step, FlatZeroStep)
    first.fit()
    root = layout.checkpoint_root(str(tmp_path))
    for later in os.listdir(root):
        if layout.is_tag_name(later) and later > "step_00000005":
            shutil.rmtree(os.path.join(root, later))
    (shard,) = glob.glob(os.path.join(root, "step_00000005", layout.OPTIM_STATES_GLOB))
    assert not os.path.basename(shard).startswith("bf16_")
    saved = torch.load(shard, weights_only=False)["optimizer_state_dict"]

    own = make_trainer(tmp_path, "bf16", 2, "engine.fused_step=false")
    assert own.resume_tag == "step_00000005" and own.fused_step is None
    zero = own.engine.optimizer
    for mine, old in zip(zero.single_partition_of_fp32_groups, saved["single_partition_of_fp32_groups"], strict=True):
        torch.testing.assert_close(mine.detach(), old, atol=0, rtol=0)
    assert next(own.engine.module.parameters()).dtype == torch.bfloat16  # DeepSpeed's bf16 weights
    inner = saved["base_optimizer_state"]
    for i, group in enumerate(zero.optimizer.param_groups):
        torch.testing.assert_close(zero.optimizer.state[group["params"][0]]["exp_avg"], inner["state"][i]["exp_avg"],
                                   atol=0, rtol=0)
    own.fit()
    assert own.progress.step == 16
