"""Issue 13, checkpoint half: a damaged tag or pointer never blocks a run, a resume checks what it
resumes, a finished run relaunched exits 0. Each case asserts its one line and that nothing was
lost: damaged tags are moved aside (`step_N.damaged`), never deleted; refused resumes touch nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import engine_worker  # noqa: E402
from engine_worker import weights  # noqa: E402
from launch_harness import clean_env  # noqa: E402
from rank_helpers import Crash, crash_at  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402

from dwnet.checkpoint import checkpointing, layout, space  # noqa: E402
from dwnet.engine import ResumeMismatchError, Trainer  # noqa: E402
from dwnet.checkpoint.layout import DamagedCheckpointError  # noqa: E402
from dwnet.checkpoint.export import resolve_tag  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_trainer(run_dir, *overrides, poison=None, switch_precision=False, n=256) -> Trainer:
    cfg = engine_worker.tiny_run_config(str(run_dir), *overrides)
    images, labels = synthetic_dataset(n)
    train = TensorTrainLoader(images, labels, cfg.data.batch_size, seed=cfg.engine.seed, poison=poison)
    val = TensorValLoader(images[:64], labels[:64], 32)
    return Trainer(cfg, 0, 1, torch.device("cpu"), train_loader=train, val_loader=val,
                   switch_precision=switch_precision)


def digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != "train.log"}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy


@pytest.fixture
def dwnet_log():
    """The run log's lines (its console handler is bound to the first test's stdout)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    logging.getLogger("dwnet").addHandler(handler)
    yield lines
    logging.getLogger("dwnet").removeHandler(handler)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, process_group) -> Path:
    """A finished 1-epoch fp32 run (tags at steps 8 and 16); tests copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("one_epoch")
    make_trainer(run_dir, "optim.epochs=1", "checkpoint.every_steps=8").fit()
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- a damaged checkpoint never blocks a run ---------------------------------------------------
def test_damaged_newest_tag_is_moved_aside_and_resume_ends_bit_identical(tmp_path, process_group, dwnet_log):
    reference = make_trainer(tmp_path / "ref", "checkpoint.every_steps=3", n=128)  # 8 steps per epoch
    reference.fit()

    crash_mid_epoch = crash_at(1, 4)  # the newest tag is step 12, the one before it step 9

    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", "checkpoint.every_steps=3", poison=crash_mid_epoch, n=128).fit()
    root = Path(layout.checkpoint_root(str(tmp_path / "run")))
    damaged = root / "step_00000012" / "mp_rank_00_model_states.pt"
    truncate(damaged)
    before = digest(root / "step_00000012")

    resumed = make_trainer(tmp_path / "run", "checkpoint.every_steps=3", n=128)
    assert resumed.resume_tag == "step_00000009"
    moved = [line for line in dwnet_log if "is damaged" in line]
    assert len(moved) == 1 and str(damaged) in moved[0] and "step_00000012.damaged" in moved[0], dwnet_log
    assert digest(root / "step_00000012.damaged") == before  # moved aside, every byte kept
    assert checkpointing.read_pointer(str(root), "latest") == "step_00000009"
    resumed.fit()
    assert (root / "step_00000012.damaged").is_dir()  # pruning and later saves leave it alone
    for (name, a), b in zip(weights(reference).items(), weights(resumed).values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_damaged_tag_named_by_eval_and_export(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    root = Path(layout.checkpoint_root(str(run_dir)))
    damaged = root / "step_00000016" / "mp_rank_00_model_states.pt"
    truncate(damaged)
    before = digest(root)
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint step_00000016 is damaged: {damaged}: .*"
                                                     "use another tag with --checkpoint-tag .complete: step_00000008"):
        resolve_tag(str(run_dir), "step_00000016")
    # Through the CLI (--export does not start a process group): one line, exit 1, nothing written.
    out = tmp_path / "out.pth"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--export", str(out), "--checkpoint-tag", "latest", "--opts",
         f"checkpoint.dir={run_dir}", "model.name=dwnet_femto", "model.num_classes=10"],
        cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "DamagedCheckpointError" in last and str(damaged) in last, result.stderr[-3000:]
    assert not out.exists() and digest(root) == before


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", b"step_99999999", None])
def test_garbage_pointers_are_rebuilt_and_never_break_saves(one_epoch_run, tmp_path, content, dwnet_log):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    best = checkpointing.read_pointer(str(root), "best")
    for name in ("latest", "best"):
        if content is None:
            (root / name).unlink()
        else:
            (root / name).write_bytes(content)
    assert checkpointing.pointer(str(root), "best") == best  # rebuilt from the tags' metadata
    assert resolve_tag(str(run_dir), "latest") == "step_00000016"
    trainer = make_trainer(run_dir, "optim.epochs=2", "checkpoint.every_steps=8")
    assert trainer.resume_tag == "step_00000016"
    if content is not None:
        assert sum("damaged or stale pointer file" in line for line in dwnet_log) == 2, dwnet_log
    trainer.cfg.checkpoint.keep_last = 1
    assert trainer.checkpointer.save(suffix="again") == "step_00000016.again"  # saves and prunes: a garbage `best` crashed it
    assert checkpointing.read_pointer(str(root), "latest") == "step_00000016.again"
    assert checkpointing.read_pointer(str(root), "best") == best and (root / best).is_dir()  # rebuilt, spared


# ---- a resume checks what it resumes -----------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.name=dwnet_nano", "holds model.name=dwnet_femto, this run has model.name=dwnet_nano; "
                              "set model.name=dwnet_femto to resume it"),
    ("model.num_classes=5", "holds model.num_classes=10, this run has model.num_classes=5"),
    ("data.batch_size=5", r"saved with global batch 16 \(data.batch_size=16 x 1 ranks x "
                          r"optim.accumulation_steps=1\); this run cannot keep it \(16 is not a multiple of "
                          r"data.batch_size=5\): set data.batch_size to 16 or 8 or 4 or 2, or pass "
                          r"--new-global-batch to continue with global batch 5"),
    ("engine.zero_stage=2", "saved with engine.zero_stage=0, this run has engine.zero_stage=2: ZeRO-0 keeps no "
                            "optimizer shards for DeepSpeed's universal converter"),
])
def test_resume_with_another_model_batch_or_stage_stops_in_one_line(one_epoch_run, process_group, override,
                                                                     message):
    before = digest(one_epoch_run)
    with pytest.raises(ResumeMismatchError, match=message) as err:
        make_trainer(one_epoch_run, "optim.epochs=2", override)
    assert "\n" not in str(err.value) and str(one_epoch_run / "checkpoints" / "step_00000016") in str(err.value)
    assert digest(one_epoch_run) == before


def test_fp32_checkpoint_stays_fp32_unless_switch_is_asked(one_epoch_run, tmp_path, process_group, dwnet_log):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    kept = make_trainer(run_dir, "optim.epochs=2", "engine.precision=bf16")
    assert kept.progress.precision == "fp32" and kept.dtype == torch.float32
    assert any("as saved (engine.precision=bf16 is not applied: pass --switch-precision" in line
               for line in dwnet_log), dwnet_log
    switched = make_trainer(run_dir, "optim.epochs=2", "engine.precision=bf16", switch_precision=True)
    assert switched.progress.precision == "bf16" and switched.dtype == torch.bfloat16
    assert (switched.progress.epoch, switched.progress.step) == (1, 16)
    for name, value in weights(kept).items():  # the saved weights, within bf16 rounding
        torch.testing.assert_close(weights(switched)[name], value, atol=1e-6, rtol=2**-8, msg=name)


def test_bf16_checkpoint_resumes_in_fp32_when_asked(tmp_path, process_group, dwnet_log):
    make_trainer(tmp_path, "optim.epochs=1", "engine.precision=bf16", n=128).fit()
    resumed = make_trainer(tmp_path, "optim.epochs=2", "engine.precision=fp32", n=128)
    assert resumed.progress.precision == "fp32" and resumed.dtype == torch.float32
    assert any("(saved in bf16) in fp32 as engine.precision asks" in line for line in dwnet_log), dwnet_log
    assert any("optim.epochs raised from 1 to 2" in line for line in dwnet_log), dwnet_log
    assert (resumed.progress.epoch, resumed.progress.step) == (1, 8)


def test_finished_run_knows_it_is_finished(one_epoch_run, tmp_path, process_group):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    before = digest(run_dir / "checkpoints")
    trainer = make_trainer(run_dir, "optim.epochs=1")
    assert trainer.finished and trainer.fit() == {}
    assert trainer.finished_message() == "run already finished (epoch 1 of 1); raise optim.epochs to continue"
    assert digest(run_dir / "checkpoints") == before
    assert not make_trainer(run_dir, "optim.epochs=2").finished


@pytest.mark.slow  # train.py through init_distributed: ~10 s
def test_finished_run_relaunched_says_so_and_exits_0(one_epoch_run, digits_betons, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")  # same model, classes, batch and stage as the CLI run
    before = digest(run_dir / "checkpoints")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--opts", f"data.train_path={digits_betons / 'train.beton'}",
         f"data.val_path={digits_betons / 'val.beton'}", f"checkpoint.dir={run_dir}", "model.name=dwnet_femto",
         "model.num_classes=10", "data.image_size=32", "data.batch_size=16", "data.num_workers=1", "optim.epochs=1",
         "optim.warmup_epochs=0",
         "log.progress=false", "log.tensorboard=false"],
        cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == \
        "run already finished (epoch 1 of 1); raise optim.epochs to continue", result.stdout[-3000:]
    assert digest(run_dir / "checkpoints") == before


@pytest.mark.slow  # 2 ranks through torch.multiprocessing: ~15 s
def test_two_ranks_agree_to_move_a_damaged_shard_aside(tmp_path):
    import torch.multiprocessing as mp

    import resume_worker
    from dwnet.distributed import free_port

    mp.spawn(resume_worker.main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"resumed_rank{rank}.json").read_text()) == {"tag": "step_00000002", "step": 2}
    root = tmp_path / "checkpoints"
    assert (root / "step_00000004.damaged").is_dir() and not (root / "step_00000004").exists()


# ---- disk space ----------------------------------------------------------------------------------
def test_save_on_a_full_disk_says_so_and_removes_the_half_written_tag(one_epoch_run, tmp_path, process_group):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    trainer = make_trainer(run_dir, "optim.epochs=2")
    before = digest(root)

    def disk_full(save_dir, tag, **kwargs):  # what torch.save reports when the disk fills mid-file
        os.makedirs(os.path.join(save_dir, tag))
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3504064 vs 3503956")

    trainer.engine.save_checkpoint = disk_full
    with pytest.raises(space.CheckpointSpaceError) as err:
        trainer.checkpointer.save(suffix="full")
    line = str(err.value)
    assert "\n" not in line and f"checkpoint {root / 'step_00000016.full'} not written: no space left" in line
    assert " free, the last tag step_00000016 takes " in line and "half-written tag was removed" in line
    assert line.endswith("(the save failed with: [enforce fail at inline_container.cc:672] . unexpected pos "
                         "3504064 vs 3503956)")
    assert not (root / "step_00000016.full").exists() and digest(root) == before


def test_incomplete_tags_are_removed_at_start_up(one_epoch_run, tmp_path, process_group, dwnet_log):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    (root / "step_00000020").mkdir()
    (root / "step_00000020" / "mp_rank_00_model_states.pt").write_bytes(b"half")  # a save cut short
    before = digest(root / "step_00000016")
    trainer = make_trainer(run_dir, "optim.epochs=2")
    assert trainer.resume_tag == "step_00000016" and not (root / "step_00000020").exists()
    assert any("removed incomplete checkpoint tags (saves cut short): step_00000020" in line for line in dwnet_log)
    assert digest(root / "step_00000016") == before


def test_preflight_names_the_space_shortfall_for_two_tags(one_epoch_run, tmp_path, monkeypatch):
    from dwnet import preflight
    from dwnet.preflight import PreflightError, run_preflight

    cfg = engine_worker.tiny_run_config(str(one_epoch_run))
    needed, basis = space.space_for_two_tags(cfg)
    root = str(one_epoch_run / "checkpoints")
    assert needed == 2 * space.tag_size(root, "step_00000016") and basis == "the newest tag step_00000016"
    fresh_needed, fresh_basis = space.space_for_two_tags(engine_worker.tiny_run_config(str(tmp_path / "new")))
    assert fresh_needed > 0 and "parameters with their optimizer state" in fresh_basis
    run_preflight([], [str(tmp_path)], hostfile="", space_needed={str(tmp_path): (1024, basis)})  # room: passes

    class Usage:
        free = 1000

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(PreflightError) as err:
        run_preflight([], [str(tmp_path)], hostfile="", space_needed={str(tmp_path): (3048, basis)})
    assert str(err.value).endswith(
        f"checkpoint.dir {tmp_path}: 1000 B free, two checkpoints need about 3.0 KiB (estimated from the newest tag "
        "step_00000016); 2.0 KiB short: free space or set checkpoint.dir to a larger disk")
    assert "\n" not in str(err.value)
