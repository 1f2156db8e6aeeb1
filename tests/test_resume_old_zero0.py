"""ZeRO-0 tags written before the fused step resume into it with their whole state.

dwnet up to 8f48e96 ran ZeRO-0 through DeepSpeed's optimizers: bf16 in DeepSpeed's low-precision
wrapper (bf16 weights; fp32 master copies and the AdamW moments in the wrapper's own state dict),
fp32 in a DeepSpeed-held torch AdamW. The old tags are written here by the current Trainer with the
fused step switched off, which builds exactly that engine (`bf16.enabled=true` at ZeRO-0, GuardedAdamW),
so DeepSpeed itself writes the old format; the test asserts the format before resuming it.

Before the fix, the bf16 tag failed to load (KeyError: 'param_groups') and the fp32 tag loaded but
failed at its first step (the saved `fused: None` switched the fused kernel off).
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import engine_worker  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402

import dwnet.engine.ds_config  # noqa: E402
import dwnet.engine.trainer  # noqa: E402
from dwnet.checkpoint import layout  # noqa: E402
from dwnet.checkpoint.export import read_client_state  # noqa: E402
from dwnet.checkpoint.optimizer_state import OptimizerStateError  # noqa: E402
from dwnet.engine import Trainer  # noqa: E402
from dwnet.engine.fused_step import FusedAdamW  # noqa: E402

SETTINGS = ("optim.epochs=2", "engine.ema=true", "engine.ema_decay=0.9", "optim.warmup_epochs=0.5")


def make_trainer(run_dir, precision: str) -> Trainer:
    cfg = engine_worker.tiny_run_config(str(run_dir), *SETTINGS, f"engine.precision={precision}",
                                        "engine.zero_stage=0", "checkpoint.every_steps=5",
                                        "checkpoint.keep_last=10")
    images, labels = synthetic_dataset(128)  # 8 steps per epoch
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, seed=cfg.engine.seed)
    val = TensorValLoader(images[:64], labels[:64], 32)
    return Trainer(cfg, 0, 1, torch.device("cpu"), train_loader=train, val_loader=val)


def old_run(run_dir, precision: str, monkeypatch) -> dict:
    """One epoch and a tag at step 5 through DeepSpeed's ZeRO-0 optimizers (dwnet before the fused
    step); the states of the step-5 tag."""
    with monkeypatch.context() as patch:
        for module in (dwnet.engine.trainer, dwnet.engine.ds_config):
            patch.setattr(module, "uses_fused_step", lambda zero_stage, precision: False)
        old = make_trainer(run_dir, precision)
        assert not isinstance(old.optimizer, FusedAdamW)
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


def test_old_bf16_zero0_tag_resumes_into_the_fused_step(tmp_path, process_group, monkeypatch):
    saved = old_run(tmp_path, "bf16", monkeypatch)
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


def test_old_fp32_zero0_tag_resumes_into_the_fused_step(tmp_path, process_group, monkeypatch):
    saved = old_run(tmp_path, "fp32", monkeypatch)
    inner = saved["optimizer"]
    assert {"state", "param_groups"} <= set(inner) and inner["param_groups"][0]["fused"] is None

    new = make_trainer(tmp_path, "fp32")
    names = {id(p): n for n, p in new.engine.module.named_parameters()}  # fp32: the module holds the weights
    masters = [saved["module"][names[id(p)]] for group in new.optimizer.param_groups for p in group["params"]]
    assert_carried_over(new, masters, inner, saved)
    new.fit()  # the first step used to fail: "Expected grad_scale and found_inf to be None"
    assert new.progress.step == 16


def test_unreadable_optimizer_state_stops_in_one_line(tmp_path, process_group, monkeypatch):
    old_run(tmp_path, "bf16", monkeypatch)
    path = os.path.join(layout.checkpoint_root(str(tmp_path)), "step_00000005", layout.MODEL_STATES_FILES[0])
    states = torch.load(path, weights_only=False)
    states["optimizer"] = {"base_optimizer_state": {}, "single_partition_of_fp32_groups": []}
    torch.save(states, path)
    with pytest.raises(OptimizerStateError) as err:
        make_trainer(tmp_path, "bf16")
    message = str(err.value)
    assert "\n" not in message and os.path.dirname(path) in message and "engine.precision=fp32" in message
