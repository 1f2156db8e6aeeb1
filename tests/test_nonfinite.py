"""The non-finite guard protects the model, not only the optimizer: on real images (the ffcv
loaders over conftest's digits), NaN and Inf batches are injected through the Trainer's loader
argument and the tests check what a skipped step leaves, where a rollback lands, and that nothing
non-finite is saved, exported, evaluated or called best."""
from __future__ import annotations

import csv
import gc
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import engine_worker  # noqa: E402
from launch_harness import REPO, clean_env  # noqa: E402
from poisoned_loaders import Poisoned, all_finite, changed, model_state  # noqa: E402
from rank_helpers import Crash, crash_at, set_rank_env  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402

from dwnet.distributed import free_port  # noqa: E402
from dwnet.checkpoint import checkpointing, layout  # noqa: E402
from dwnet.engine import Trainer  # noqa: E402
from dwnet.checkpoint.export import read_client_state  # noqa: E402

CPU = torch.device("cpu")
NAN, INF = math.nan, math.inf


def ffcv_overrides(betons) -> list[str]:
    """dwnet_femto on the 160 digits at 32px, no augmentation: 10 steps per epoch on one rank;
    16 epochs at this LR reach 86-95% top-1 on them, run to run within ~5 points of each other
    (chance, what a model with poisoned BatchNorm statistics scores, is 10%)."""
    return [f"data.train_path={betons}/train.beton", f"data.val_path={betons}/val.beton", "data.image_size=32",
            "data.num_workers=1", "data.batches_ahead=1", "augment.rand_augment=", "augment.random_erasing=0",
            "augment.mixup=0", "augment.cutmix=0", "optim.epochs=16", "optim.warmup_epochs=1",
            "optim.base_lr=0.002", "optim.lr_reference_batch=16"]


@pytest.fixture(scope="module")
def digits(digits_betons, process_group):
    """One rank's ffcv train and eval loaders over the digits, compiled once for the module. The
    evaluation reads the 160 training images: on the 47 of the val split one image moves top-1 by
    2 points, too coarse to compare two short runs 'within a few points'."""
    import dataclasses

    from dwnet.data import build_train_loader, build_val_loader

    cfg = engine_worker.tiny_run_config("unused", *ffcv_overrides(digits_betons))
    train = build_train_loader(cfg.data, cfg.augment, num_classes=10, rank=0, world_size=1, seed=0, device=CPU)
    val = build_val_loader(dataclasses.replace(cfg.data, val_path=cfg.data.train_path), rank=0, world_size=1,
                           device=CPU)
    yield digits_betons, train, val
    del train, val
    gc.collect()


def digits_trainer(digits, run_dir, *overrides, **poison) -> Trainer:
    betons, train, val = digits
    cfg = engine_worker.tiny_run_config(str(run_dir), *ffcv_overrides(betons), *overrides)
    loader = Poisoned(train, **poison) if poison else train
    return Trainer(cfg, 0, 1, CPU, train_loader=loader, val_loader=val)


@pytest.fixture(scope="module")
def clean_top1(digits, tmp_path_factory):
    """Validation top-1 of an unpoisoned run per setting, trained once per module."""
    cache: dict[tuple[str, ...], float] = {}

    def get(*overrides: str) -> float:
        if overrides not in cache:
            run = digits_trainer(digits, tmp_path_factory.mktemp("clean"), *overrides).fit()
            cache[overrides] = run["val_top1"]
        return cache[overrides]

    return get


def assert_near_clean(final: dict, clean: float) -> None:
    assert math.isfinite(final["val_loss"]) and math.isfinite(final["train_loss"]), final
    assert final["val_top1"] > 70.0 and abs(final["val_top1"] - clean) <= 8.0, (final["val_top1"], clean)


class Recorder:
    """Model state captured at chosen (epoch, batch) points of the training loop."""

    def __init__(self, points):
        self.points, self.states, self.trainer = set(points), {}, None

    def __call__(self, epoch: int, batch: int) -> None:
        if (epoch, batch) in self.points:
            self.states[(epoch, batch)] = model_state(self.trainer)


class WarningLines(logging.Handler):
    """The run log's warning lines (the 'dwnet' logger does not propagate to pytest's caplog)."""

    def __enter__(self):
        self.lines: list[str] = []
        logging.getLogger("dwnet").addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        logging.getLogger("dwnet").removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.lines.append(record.getMessage())


# ---- a skipped step changes nothing ---------------------------------------------------------------
@pytest.mark.parametrize("precision,zero_stage,value", [("fp32", 0, NAN), ("bf16", 2, NAN), ("fp32", 0, INF)],
                         ids=["fp32-zero0-nan", "bf16-zero2-nan", "fp32-zero0-inf"])
def test_one_bad_batch_changes_nothing_and_the_run_ends_near_a_clean_one(digits, tmp_path, clean_top1,
                                                                         precision, zero_stage, value):
    setting = (f"engine.precision={precision}", f"engine.zero_stage={zero_stage}")
    full_run = math.isnan(value)  # the Inf case only checks the skip itself (one epoch)
    short = () if full_run else ("optim.epochs=1", "optim.warmup_epochs=0")
    recorder = Recorder([(0, 3), (0, 4)])  # before step 4 (batch 3 is the bad one) and after it
    trainer = digits_trainer(digits, tmp_path, *setting, *short, "engine.ema=true", "engine.ema_decay=0.9",
                             bad={(0, 3): value}, observe=recorder)
    recorder.trainer = trainer
    final = trainer.fit()
    assert trainer.guard.total_skipped == 1
    before, after = recorder.states[(0, 3)], recorder.states[(0, 4)]
    assert not changed(before, after), changed(before, after)[:5]
    assert any("running_var" in k for k in before) and any(k.startswith("ema.") for k in before)
    assert all_finite(model_state(trainer))
    if full_run:
        assert_near_clean(final, clean_top1(*setting))


def test_accumulation_restores_buffers_from_before_the_first_micro_batch(digits, tmp_path):
    """NaN in the second micro-batch of step 3: the buffers go back to where they were before the
    step's first (clean) micro-batch, which had already moved them."""
    recorder = Recorder([(0, 4), (0, 5), (0, 6)])  # step 3 = batches 4 and 5
    trainer = digits_trainer(digits, tmp_path, "optim.accumulation_steps=2", "optim.epochs=1",
                             "optim.warmup_epochs=0", bad={(0, 5): NAN}, observe=recorder)
    recorder.trainer = trainer
    trainer.fit()
    assert trainer.guard.total_skipped == 1
    start, middle, end = (recorder.states[(0, b)] for b in (4, 5, 6))
    assert any("running_mean" in k for k in changed(start, middle))  # the first micro-batch moved them
    assert not changed(start, end), changed(start, end)[:5]


def test_verdicts_are_read_at_logging_steps_and_name_the_skipped_step(digits, tmp_path):
    """The host reads the steps' verdicts only at logging steps (every 4 here): the bad step 2 is
    reported when step 4 ends, under its own number, and had changed nothing meanwhile."""
    recorder = Recorder([(0, 1), (0, 2)])  # before step 2 (batch 1 is the bad one) and after it
    skip_lines_before_batch: dict[int, int] = {}
    with WarningLines() as lines:
        def observe(epoch: int, batch: int) -> None:
            recorder(epoch, batch)
            skip_lines_before_batch[batch] = sum("skipped:" in line for line in lines)

        trainer = digits_trainer(digits, tmp_path, "optim.epochs=1", "optim.warmup_epochs=0", "log.every_steps=4",
                                 "engine.ema=true", "engine.ema_decay=0.9", bad={(0, 1): NAN}, observe=observe)
        recorder.trainer = trainer
        trainer.fit()
    assert skip_lines_before_batch[2] == skip_lines_before_batch[3] == 0  # steps 2 and 3 done, nothing read
    assert skip_lines_before_batch[4] == 1  # read when step 4 ended
    assert [line.split(":")[0] for line in lines if "skipped:" in line] == ["step 2 skipped"]
    assert trainer.guard.total_skipped == 1
    before, after = recorder.states[(0, 1)], recorder.states[(0, 2)]
    assert not changed(before, after), changed(before, after)[:5]


def bn_overflow_model(cfg) -> nn.Module:
    """A BatchNorm whose input can overflow its variance while its output, and so the loss and
    the gradients, stay finite (1/sqrt(inf) is 0): only the running statistics see the Inf."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_overflow_only_in_batchnorm_statistics_is_skipped(tmp_path, process_group):
    images, labels = synthetic_dataset(64)
    cfg = engine_worker.tiny_run_config(str(tmp_path), "optim.epochs=1")
    trainer = Trainer(cfg, 0, 1, CPU, train_loader=TensorTrainLoader(images, labels, 16),
                      val_loader=TensorValLoader(images, labels, 32), model_factory=bn_overflow_model)
    x, y = images[:16], labels[:16]
    trainer.micro_step(x, y, micro_batch=0)
    assert not trainer.finish_step().skipped
    huge = x * 1e20
    probe = bn_overflow_model(cfg).train()
    probe.load_state_dict(trainer.engine.module.state_dict())
    loss = trainer.loss_fn(probe(huge), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in probe.parameters())
    assert not torch.isfinite(probe[1].running_var).all()  # the case: a finite loss, an Inf statistic

    before = model_state(trainer)
    trainer.micro_step(huge, y, micro_batch=0)
    outcome = trainer.finish_step()
    assert outcome.skipped and outcome.buffer_ranks == 1 and outcome.loss_ranks == 0
    assert "BatchNorm statistics on 1 of 1 ranks" in outcome.reason()
    assert not changed(before, model_state(trainer))


# ---- several ranks ----------------------------------------------------------------------------------
def only_rank1_sees_nan(rank: int, world_size: int, port: int, out_dir: str, betons: str) -> None:
    set_rank_env(rank, world_size, port)
    from dwnet.data import build_train_loader, build_val_loader
    from dwnet.distributed import init_distributed

    init_distributed()
    cfg = engine_worker.tiny_run_config(os.path.join(out_dir, "run"), *ffcv_overrides(betons), "optim.epochs=1",
                                        "optim.warmup_epochs=0", "engine.zero_stage=1")
    train = build_train_loader(cfg.data, cfg.augment, num_classes=10, rank=rank, world_size=world_size, seed=0,
                               device=CPU)
    val = build_val_loader(cfg.data, rank=rank, world_size=world_size, device=CPU)
    recorder = Recorder([(0, 1), (0, 2)])  # batch 1 is NaN on rank 1 only
    loader = Poisoned(train, bad={(0, 1): NAN} if rank == 1 else {}, observe=recorder)
    trainer = Trainer(cfg, rank, world_size, CPU, train_loader=loader, val_loader=val)
    recorder.trainer = trainer
    final = trainer.fit()
    before, after = recorder.states[(0, 1)], recorder.states[(0, 2)]
    result = {"skipped": trainer.guard.total_skipped, "changed": changed(before, after),
              "finite": all_finite(model_state(trainer)), "val_loss": final["val_loss"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_nan_on_one_rank_makes_every_rank_skip_and_restore(digits_betons, tmp_path):
    mp.spawn(only_rank1_sees_nan, args=(2, free_port(), str(tmp_path), str(digits_betons)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["skipped"] == 1, (rank, result)
        assert result["changed"] == [], (rank, result["changed"][:5])
        assert result["finite"] and math.isfinite(result["val_loss"]), (rank, result)


# ---- rollback ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_last", [2, 1])
def test_bf16_episode_rolls_back_to_the_tag_before_the_first_skip(digits, tmp_path, clean_top1, keep_last):
    """Batches 5-7 are NaN once: steps 6, 7, 8 skip; step_00000006 is written after the first
    skip (so marked), and the rollback at step 8 must land on step_00000004, even with keep_last 1."""
    root = layout.checkpoint_root(str(tmp_path))
    seen: dict[str, object] = {}

    def look_at_tags(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 7) and "tags" not in seen:  # after step 7: step_6 written, rollback ahead
            seen["tags"] = layout.complete_tags(root)
            seen["meta6"] = layout.TagMeta.read(root, "step_00000006")

    setting = ("engine.precision=bf16", "engine.zero_stage=2")
    trainer = digits_trainer(digits, tmp_path, *setting, "checkpoint.every_steps=2",
                             f"checkpoint.keep_last={keep_last}", "engine.nonfinite_max_skips=3",
                             "engine.nonfinite_window=10",
                             bad={(0, 5): NAN, (0, 6): NAN, (0, 7): NAN}, observe=look_at_tags)
    with WarningLines() as warnings:
        final = trainer.fit()
    assert seen["meta6"].episode == 6  # marked: saved with the episode open
    assert "step_00000004" in seen["tags"]  # spared by pruning: it is the rollback target
    p = trainer.progress
    assert p.history == [{"step": 4, "from": "bf16", "to": "fp32"}] and p.precision == "fp32" and p.fallbacks == 1
    assert trainer.engine.bfloat16_enabled() is False
    skip_lines = [w for w in warnings if "skipped:" in w]
    assert [w.split("(")[-1] for w in skip_lines] == [f"{n} skipped in the last 10 steps)" for n in (1, 2, 3)]
    rollback = [w for w in warnings if w.startswith("rolling back")]
    assert len(rollback) == 1 and "rolling back to step_00000004" in rollback[0]
    assert "the first skipped step 6" in rollback[0] and "step_00000006" in rollback[0]  # and it was removed
    assert all_finite(model_state(trainer))
    for tag in layout.complete_tags(root):  # the replayed tags are clean ones
        assert checkpointing.is_clean(root, tag), tag
    assert_near_clean(final, clean_top1(*setting))


def test_non_finite_ema_is_never_saved_and_starts_the_rollback(tmp_path, process_group):
    """A NaN that the step guard cannot see (here: written into the EMA) stops the save; nothing
    is written, and the run rolls back to the last clean tag, EMA included."""
    images, labels = synthetic_dataset(256)
    cfg = engine_worker.tiny_run_config(str(tmp_path), "engine.ema=true", "engine.ema_decay=0.9",
                                        "checkpoint.every_steps=4", "optim.epochs=1")
    trainer = None

    def corrupt_ema(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 5) and trainer.progress.fallbacks == 0:
            next(trainer.ema.module.parameters()).data[0] = math.inf

    loader = Poisoned(TensorTrainLoader(images, labels, 16), bad={}, observe=corrupt_ema)
    trainer = Trainer(cfg, 0, 1, CPU, train_loader=loader, val_loader=TensorValLoader(images[:64], labels[:64], 32))
    with WarningLines() as warnings:
        trainer.fit()
    assert trainer.progress.fallbacks == 1 and trainer.progress.history[0]["step"] == 4
    assert any("rolling back to step_00000004" in w and "not finite at step 8" in w for w in warnings), warnings
    root = layout.checkpoint_root(str(tmp_path))
    for tag in layout.complete_tags(root):
        ema = read_client_state(root, tag)["ema"]
        assert all(torch.isfinite(v).all() for v in ema.values() if v.is_floating_point()), tag
    assert all_finite(model_state(trainer))


class NaNOnFirstEval:
    """A val loader whose first pass is NaN images: a finite model with a non-finite evaluation."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        for images, labels in self.loader:
            yield (torch.full_like(images, math.nan) if self.passes == 1 else images), labels


def test_non_finite_evaluation_is_reported_and_never_best(digits, tmp_path):
    betons, train, val = digits
    cfg = engine_worker.tiny_run_config(str(tmp_path), *ffcv_overrides(betons), "optim.epochs=2")
    trainer = Trainer(cfg, 0, 1, CPU, train_loader=train, val_loader=NaNOnFirstEval(val))
    with WarningLines() as warnings:
        trainer.fit()
    assert sum("evaluation loss is not finite" in w for w in warnings) == 1
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["val_loss"] for r in rows][0] == "nan" and "not a best candidate" in rows[0]["note"]
    assert rows[1]["note"] == "" and math.isfinite(float(rows[1]["val_loss"]))
    root = layout.checkpoint_root(str(tmp_path))
    best = checkpointing.read_pointer(root, "best")
    assert layout.TagMeta.read(root, best).epoch == 2


# ---- the command line: stop, resume, export, eval -------------------------------------------------
def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(OMP_NUM_THREADS="1"))


def run_opts(betons, run_dir) -> list[str]:
    return ["--config", "ds_configs/demo_cpu.yaml", "--no-preflight", "--opts", "model.name=dwnet_femto",
            f"data.train_path={betons}/train.beton", f"data.val_path={betons}/val.beton", "data.batch_size=16",
            "optim.epochs=2", "optim.warmup_epochs=0", "engine.zero_stage=0", "checkpoint.every_steps=2",
            "engine.nonfinite_max_skips=2", "engine.nonfinite_window=10", "log.progress=false",
            f"checkpoint.dir={run_dir}"]


@pytest.mark.slow
def test_persistent_nan_stops_in_one_line_and_the_clean_tag_resumes_to_a_finite_model(digits_betons, tmp_path):
    run_dir = tmp_path / "run"
    stopped = cli("tests/poisoned_train.py", "--nan-from-batch", "5", *run_opts(digits_betons, run_dir))
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if "training stopped" in line]
    assert len(lines) == 1 and "again after the fallback; lower optim.base_lr" in lines[0], stopped.stderr[-3000:]
    assert "restarts from step_00000004.fallback1" in lines[0]
    root = layout.checkpoint_root(str(run_dir))
    assert layout.newest_complete_tag(root) == "step_00000004.fallback1"
    assert all(checkpointing.is_clean(root, t) for t in layout.complete_tags(root))

    resumed = cli("train.py", *run_opts(digits_betons, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000004.fallback1" in resumed.stdout
    final = json.loads([line for line in resumed.stdout.splitlines() if line.startswith('{"final"')][-1])["final"]
    assert math.isfinite(final["val_loss"]) and final["precision"] == "fp32"
    out = tmp_path / "model.pth"
    exported = cli("train.py", *run_opts(digits_betons, run_dir)[:3], "--export", str(out), "--checkpoint-tag",
                   "latest", *run_opts(digits_betons, run_dir)[3:])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert all(torch.isfinite(v).all() for v in torch.load(out, weights_only=True)["model"].values()
               if v.is_floating_point())


def load_train_py():
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_refuses_a_non_finite_checkpoint_in_one_line(tmp_path, process_group):
    train = load_train_py()
    cfg_opts = ["--opts", "model.name=dwnet_femto", "model.num_classes=10", f"checkpoint.dir={tmp_path}"]
    images, labels = synthetic_dataset(64)
    cfg = engine_worker.tiny_run_config(str(tmp_path), "optim.epochs=1")
    trainer = Trainer(cfg, 0, 1, CPU, train_loader=TensorTrainLoader(images, labels, 16))
    trainer.fit()
    next(b for n, b in trainer.engine.module.named_buffers() if "running_var" in n).fill_(math.nan)
    # Written behind the guard's back (as a damaged or foreign checkpoint would be).
    checkpointing.save(trainer.engine, trainer.checkpoints, 99, {"progress": trainer.progress.state()}, keep_last=5)
    with pytest.raises(SystemExit) as stop:
        train.main(["--export", str(tmp_path / "out.pth"), "--checkpoint-tag", "step_00000099", *cfg_opts])
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith("export refused:") and "running_var" in message
    assert "--checkpoint-tag" in message and "step_00000004" in message
    assert not (tmp_path / "out.pth").exists()


def test_eval_of_a_model_with_non_finite_buffers_fails_in_one_line(digits_betons, tmp_path):
    import timm

    model = timm.create_model("dwnet_femto", num_classes=10)
    next(b for n, b in model.named_buffers() if "running_mean" in n).fill_(math.inf)
    torch.save({"model": model.state_dict()}, tmp_path / "damaged.pth")
    out = cli("train.py", "--eval", "--resume", str(tmp_path / "damaged.pth"), *run_opts(digits_betons, tmp_path))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "eval refused" in line]
    assert len(lines) == 1 and "damaged.pth" in lines[0] and "running_mean" in lines[0], out.stderr[-2000:]
    assert '{"eval"' not in out.stdout


def test_an_episode_stays_open_across_a_crash_and_resume(tmp_path, process_group):
    """Step 3 skips; the tag of step 4 is marked; the run crashes; after the resume the tag of
    step 6 is still inside the episode (window 4), so it is marked too and never a rollback target."""
    images, labels = synthetic_dataset(128)

    crash_at_batch_5 = crash_at(0, 5)

    def trainer_for(observe=None):
        cfg = engine_worker.tiny_run_config(str(tmp_path), "checkpoint.every_steps=2", "checkpoint.keep_last=20",
                                            "optim.epochs=1", "engine.nonfinite_window=4")
        loader = Poisoned(TensorTrainLoader(images, labels, 16), bad={(0, 2): NAN}, observe=observe)
        return Trainer(cfg, 0, 1, CPU, train_loader=loader)

    with pytest.raises(Crash):
        trainer_for(observe=crash_at_batch_5).fit()
    root = layout.checkpoint_root(str(tmp_path))
    assert layout.TagMeta.read(root, "step_00000004").episode == 3
    resumed = trainer_for()
    assert resumed.resume_tag == "step_00000004"
    resumed.fit()
    assert layout.TagMeta.read(root, "step_00000006").episode == 3
    assert checkpointing.is_clean(root, "step_00000008")  # step 3 left the window at step 7
    assert checkpointing.rollback_target(root) == "step_00000008"


def fake_tag(root, tag: str, best: str, episode: int | None = None) -> None:
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    layout.TagMeta(step=int(tag.removeprefix("step_")), best=best, episode=episode).write(root, tag)


def test_rollback_bookkeeping_targets_prunes_and_pointers(tmp_path):
    """On tag directories alone: the rollback target is the newest unmarked tag, pruning spares it
    whatever keep_last, and discarding the newer tags puts `latest` and `best` back."""
    root = str(tmp_path)
    fake_tag(root, "step_00000002", best="step_00000002")
    fake_tag(root, "step_00000004", best="step_00000002")
    fake_tag(root, "step_00000006", best="step_00000006", episode=5)
    fake_tag(root, "step_00000008", best="step_00000006", episode=5)
    os.makedirs(os.path.join(root, "step_00000010"))  # a killed save: no COMPLETE
    for name, tag in (("best", "step_00000006"), ("latest", "step_00000008")):
        (tmp_path / name).write_text(tag)
    assert checkpointing.rollback_target(root) == "step_00000004"
    checkpointing.prune(root, keep_last=1)
    assert layout.complete_tags(root) == ["step_00000004", "step_00000006", "step_00000008"]
    assert not (tmp_path / "step_00000010").exists()
    assert checkpointing.discard_after(root, "step_00000004") == ["step_00000006", "step_00000008"]
    assert layout.complete_tags(root) == ["step_00000004"]
    assert checkpointing.read_pointer(root, "latest") == "step_00000004"
    assert not (tmp_path / "best").exists()  # its best, step_00000002, was pruned: no stale pointer

    again = str(tmp_path / "again")  # without pruning in between, `best` goes back to step_00000002
    fake_tag(again, "step_00000002", best="step_00000002")
    fake_tag(again, "step_00000004", best="step_00000002")
    fake_tag(again, "step_00000006", best="step_00000006", episode=5)
    (tmp_path / "again" / "best").write_text("step_00000006")
    checkpointing.discard_after(again, checkpointing.rollback_target(again))
    assert checkpointing.read_pointer(again, "best") == "step_00000002"
