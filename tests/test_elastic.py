"""Elastic resume: a run saved on W ranks continues on W' ranks (or another ZeRO stage) with the
global batch kept, the optimizer state resharded through DeepSpeed's universal checkpoint, and
buffers, EMA, progress and schedule from dwnet's own state."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import elastic_worker  # noqa: E402
from weight_compare import CANCELLED_BIAS, beyond, running_statistics, trained_parameters  # noqa: E402

from dwnet.distributed import free_port  # noqa: E402
from dwnet.checkpoint import checkpointing, layout, universal  # noqa: E402
from dwnet.engine import ResumeMismatchError  # noqa: E402
from dwnet.checkpoint.resume import plan_resume  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains on 1-4 ranks through torch.multiprocessing
SETTINGS = ["z0_fp32", "z1_fp32", "z2_fp32", "z3_fp32", "z0_bf16", "z2_bf16", "z3_bf16"]


def run_phase(world: int, phase: str, out: Path, settings: list[str], *extra: str) -> dict[str, dict]:
    mp.spawn(elastic_worker.main, args=(world, free_port(), phase, str(out), settings, list(extra)), nprocs=world,
             join=True)
    return {s: torch.load(out / f"{s}.{phase}.pt", weights_only=False) for s in settings}


def copy_runs(src: Path, dst: Path, settings: list[str], renames: dict[str, str] | None = None) -> None:
    for setting in settings:
        shutil.copytree(src / setting, dst / (renames or {}).get(setting, setting))


def differences(saved: dict, resumed: dict) -> list[str]:
    """Keys whose values are not exactly equal (the progress may only differ in nothing at all)."""
    assert saved.keys() <= resumed.keys(), saved.keys() - resumed.keys()
    bad = []
    for key, value in saved.items():
        if key in ("resume_tag", "accumulation_steps"):  # what the resume itself reports
            continue
        other = resumed[key]
        same = torch.equal(value, other) if torch.is_tensor(value) else value == other
        if not same:
            bad.append(key)
    return bad


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("two_ranks")
    return out, run_phase(2, "save", out, SETTINGS, "optim.accumulation_steps=2")  # global batch 8 x 2 x 2


def test_after_a_save_every_rank_holds_what_the_tag_holds(saved_on_two_ranks):
    """The tag keeps rank 0's copy of what is replicated (weights, BatchNorm statistics, EMA), so
    every rank must hold the same at a save, or a resume changes the other ranks' state: the EMA's
    BatchNorm statistics, lerped from each rank's own, once differed by rank and were lost."""
    source, saved = saved_on_two_ranks
    for setting in SETTINGS:
        other = torch.load(source / f"{setting}.save.rank1.pt", weights_only=False)
        assert differences(saved[setting], other) == [], setting


def test_resume_on_one_two_and_four_ranks_restores_the_saved_state_exactly(saved_on_two_ranks, tmp_path):
    source, saved = saved_on_two_ranks
    one = tmp_path / "one"
    copy_runs(source, one, SETTINGS)
    on_one = run_phase(1, "resume", one, SETTINGS)
    for setting in SETTINGS:
        assert on_one[setting]["accumulation_steps"] == 4, setting
        assert differences(saved[setting], on_one[setting]) == [], f"2 -> 1 ranks, {setting}"
        assert on_one[setting]["resume_tag"] == "step_00000004"
    # Tags written by the 1-rank run (step_00000004.w1) resumed on 2 ranks.
    two = tmp_path / "two"
    copy_runs(one, two, SETTINGS)
    on_two = run_phase(2, "resume", two, SETTINGS)
    for setting in SETTINGS:
        assert on_two[setting]["resume_tag"] == "step_00000004.w1" and on_two[setting]["accumulation_steps"] == 2
        assert differences(on_one[setting], on_two[setting]) == [], f"1 -> 2 ranks, {setting}"
    four = tmp_path / "four"
    copy_runs(source, four, SETTINGS)
    on_four = run_phase(4, "resume", four, SETTINGS)
    for setting in SETTINGS:
        assert on_four[setting]["accumulation_steps"] == 1
        assert differences(saved[setting], on_four[setting]) == [], f"2 -> 4 ranks, {setting}"
    # ZeRO 1-3 tags went through a universal copy; ZeRO-0 ones (whole optimizer state) loaded directly.
    for setting in SETTINGS:
        partitioned = not setting.startswith("z0")
        assert universal.is_converted(str(one / setting / "checkpoints"), "step_00000004") == partitioned


def test_zero_stage_change_on_resume_restores_the_state(saved_on_two_ranks, tmp_path):
    source, saved = saved_on_two_ranks
    copy_runs(source, tmp_path, ["z2_fp32"], renames={"z2_fp32": "z3_fp32"})
    resumed = run_phase(1, "resume", tmp_path, ["z3_fp32"])["z3_fp32"]
    without_ema = {k: v for k, v in saved["z2_fp32"].items() if not k.startswith("ema.")}  # none under ZeRO-3
    assert differences(without_ema, resumed) == []
    copy_runs(source, tmp_path / "down", ["z3_bf16"], renames={"z3_bf16": "z1_bf16"})
    down = run_phase(2, "resume", tmp_path / "down", ["z1_bf16"])["z1_bf16"]
    assert differences(saved["z3_bf16"], down) == []


def test_one_rank_with_accumulation_trains_like_two_ranks(tmp_path):
    """Same micro-batches in every step (drop-path masks included): only the summation order differs.

    Rounding noise is not the same everywhere (tests/weight_compare.py): the biases BatchNorm cancels
    are exempt (the next test proves it cancels them), and of all other parameters' elements at most
    1 in 10,000 may differ by more than 1e-4 (none by more than 1e-3). BatchNorm running statistics
    (averaged over ranks, as at every save) must agree too: `bn_accumulation` makes them independent
    of the layout; exempt there is the running mean that tracks a cancelled bias. `num_batches_tracked` counts each rank's own
    micro-batches, so it is layout-dependent by definition and not compared."""
    extra = ("model.drop_path_rate=0.2", "augment.label_smoothing=0.1")
    one = run_phase(1, "train", tmp_path / "one", ["z2_fp32"], "optim.accumulation_steps=4", *extra)["z2_fp32"]
    two = run_phase(2, "train", tmp_path / "two", ["z2_fp32"], "optim.accumulation_steps=2", *extra)["z2_fp32"]
    params = trained_parameters(one)
    assert len(params) > 50
    off, total, largest = beyond(one, two, params, 1e-4)
    assert off <= total // 10_000 and largest < 1e-3, (off, total, largest)
    statistics = running_statistics(one)
    assert len(statistics) > 20
    for key in statistics:
        torch.testing.assert_close(one[key], two[key], atol=1e-4, rtol=1e-4, msg=key)
    other_masks = run_phase(1, "train", tmp_path / "seed", ["z2_fp32"], "optim.accumulation_steps=4",
                            "engine.seed=1", *extra)["z2_fp32"]
    assert beyond(one, other_masks, params, 1e-4)[0] > total // 100  # what a real difference looks like


def test_the_exempted_biases_are_cancelled_by_batchnorm_in_training():
    from dwnet.models import create_model

    model = create_model("dwnet_femto", num_classes=10).train()
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    before = model(images)
    biases = [p for name, p in model.named_parameters() if name.endswith(CANCELLED_BIAS)]
    assert biases
    with torch.no_grad():
        for bias in biases:
            bias.add_(torch.randn_like(bias))
    torch.manual_seed(0)
    torch.testing.assert_close(model(images), before, atol=1e-4, rtol=1e-4)


def test_a_killed_conversion_is_redone_and_the_tag_is_untouched(saved_on_two_ranks, tmp_path):
    source, _ = saved_on_two_ranks
    root = tmp_path / "checkpoints"
    shutil.copytree(source / "z2_fp32" / "checkpoints", root)
    tag_dir = root / "step_00000004"
    before = {p.name: p.read_bytes() for p in tag_dir.iterdir()}
    partial = root / "universal" / ("step_00000004" + universal.PARTIAL)
    partial.mkdir(parents=True)
    (partial / "zero").mkdir()  # what a conversion killed half way leaves
    (partial / "zero" / "half.pt").write_bytes(b"PK\x03")
    path = universal.convert(str(root), "step_00000004", workers=1)
    assert Path(path, universal.DONE).is_file() and Path(path, "zero").is_dir() and not partial.exists()
    assert not Path(path, "zero", "half.pt").exists()
    assert {p.name: p.read_bytes() for p in tag_dir.iterdir()} == before
    assert universal.convert(str(root), "step_00000004") == path  # done once


def test_a_failing_conversion_is_one_line_and_leaves_the_tag_alone(saved_on_two_ranks, tmp_path):
    source, _ = saved_on_two_ranks
    root = tmp_path / "checkpoints"
    shutil.copytree(source / "z2_fp32" / "checkpoints", root)
    (root / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a file missing in the tag
    before = sorted(p.name for p in (root / "step_00000004").iterdir())
    with pytest.raises(universal.ConversionError) as err:
        universal.convert(str(root), "step_00000004", workers=1)
    line = str(err.value)
    assert "\n" not in line and "step_00000004" in line and "the tag is untouched" in line
    assert sorted(p.name for p in (root / "step_00000004").iterdir()) == before
    assert not (root / "universal" / ("step_00000004" + universal.PARTIAL)).exists()


def test_a_conversion_without_room_is_refused_in_one_line(saved_on_two_ranks, tmp_path, monkeypatch):
    source, _ = saved_on_two_ranks
    root = tmp_path / "checkpoints"
    shutil.copytree(source / "z2_fp32" / "checkpoints", root)
    monkeypatch.setattr(universal, "free_bytes", lambda path: 1000)  # a full disk, without filling one
    with pytest.raises(universal.ConversionError) as err:
        universal.convert(str(root), "step_00000004", workers=1)
    line = str(err.value)
    assert "\n" not in line and "1000 B are free" in line and "the tag is untouched" in line
    assert not (root / "universal" / "step_00000004.partial").exists()
    assert checkpointing.verify_tag(str(root), "step_00000004") is None


def test_a_disk_filling_up_during_the_conversion_is_one_line(saved_on_two_ranks, tmp_path, monkeypatch):
    source, _ = saved_on_two_ranks
    root = tmp_path / "checkpoints"
    shutil.copytree(source / "z2_fp32" / "checkpoints", root)

    def disk_full(folder):  # what torch.save reports when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(universal, "_optimizer_state_for_every_stage", disk_full)
    with pytest.raises(universal.ConversionError) as err:
        universal.convert(str(root), "step_00000004", workers=1)
    line = str(err.value)
    assert "\n" not in line and "(no space left on its disk, " in line and "unexpected pos 768" in line
    assert "the tag is untouched and the partial copy was removed" in line
    assert not (root / "universal" / "step_00000004.partial").exists()
    assert checkpointing.verify_tag(str(root), "step_00000004") is None


def test_a_global_batch_that_cannot_be_kept_names_the_world_sizes_that_can(saved_on_two_ranks):
    from engine_worker import tiny_run_config

    source, _ = saved_on_two_ranks
    root = str(source / "z2_fp32" / "checkpoints")
    cfg = tiny_run_config(str(source / "z2_fp32"), *elastic_worker.overrides("z2_fp32"))
    before = sorted(os.listdir(os.path.join(root, "step_00000004")))
    with pytest.raises(ResumeMismatchError) as err:
        plan_resume(cfg, root, "step_00000004", world_size=3)
    line = str(err.value)
    assert "\n" not in line and "global batch 32" in line and "relaunch on 1, 2, 4 ranks" in line
    assert "--new-global-batch" in line
    with pytest.raises(ResumeMismatchError, match="relaunch on 1, 2, 4 ranks"):  # more ranks than slots
        plan_resume(cfg, root, "step_00000004", world_size=8)
    plan = plan_resume(cfg, root, "step_00000004", world_size=4)
    assert plan.accumulation_steps == 1 and plan.reshard
    assert plan.announcements == ["world size 2 -> 4: accumulation 2 -> 1, global batch 32 kept"]
    assert sorted(os.listdir(os.path.join(root, "step_00000004"))) == before
    assert layout.newest_complete_tag(root) == "step_00000004"

