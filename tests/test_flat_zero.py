"""dwnet's flat ZeRO-1/2 step (dwnet/engine/flat_zero.py, a monkeypatch of DeepSpeed's ZeRO
optimizer): the same arithmetic as DeepSpeed's own step, the same refusal of a non-finite step on
every rank, and a clear refusal to install where its assumptions do not hold."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import flat_zero_worker  # noqa: E402
from engine_worker import tiny_run_config  # noqa: E402
from weight_compare import beyond, running_statistics, trained_parameters  # noqa: E402

from dwnet.distributed import free_port  # noqa: E402
from dwnet.engine import Trainer  # noqa: E402
from dwnet.engine.flat_zero import FlatZeroStep, UnsupportedZeroOptimizer  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("flat_zero")
    mp.spawn(flat_zero_worker.main, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow  # 2 ranks x 6 short trainings: ~30 s
@pytest.mark.parametrize("stage", [1, 2])
def test_flat_step_updates_like_deepspeeds_own_zero_step(two_rank_results, stage):
    """Two ranks, 2 micro-batches per step, clipping active: the same global gradient norm at every
    step (before clipping), and after 4 steps every weight and running statistic agrees with
    DeepSpeed's per-tensor ZeRO path to 1e-4 (fused vs unfused AdamW and the order of the average
    differ in rounding only; the biases BatchNorm cancels are rounding noise scaled up by Adam:
    tests/weight_compare.py), and the two ranks hold the same weights."""
    for rank, results in enumerate(two_rank_results):
        flat, own = results[f"z{stage}_flat"], results[f"z{stage}_deepspeed"]
        assert flat["fused_step"] == "FlatZeroStep" and own["fused_step"] is None, (rank, flat["fused_step"])
        assert flat["skipped"] == own["skipped"] == [False] * flat_zero_worker.STEPS
        # Adam and clipping forgive a wrongly scaled average; the norm of the averaged gradients does not.
        torch.testing.assert_close(flat["grad_norms"], own["grad_norms"], rtol=1e-5, atol=0)
        params = trained_parameters(flat["weights"])
        assert len(params) > 50
        off, total, largest = beyond(flat["weights"], own["weights"], params, 1e-4)
        assert off == 0, (rank, off, total, largest)
        statistics = running_statistics(flat["weights"])
        assert beyond(flat["weights"], own["weights"], statistics, 1e-4)[0] == 0, rank
    first, second = (results[f"z{stage}_flat"]["weights"] for results in two_rank_results)
    assert all(torch.equal(first[k], second[k]) for k in params)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_nan_on_one_rank_is_refused_by_every_rank_and_changes_nothing(two_rank_results, stage):
    for rank, results in enumerate(two_rank_results):
        nan = results[f"z{stage}_nan"]
        expected = [step == flat_zero_worker.BAD_STEP for step in range(flat_zero_worker.STEPS)]
        assert nan["skipped"] == expected, (rank, nan["skipped"])
        assert nan["changed_by_bad_step"] == [], (rank, nan["changed_by_bad_step"][:5])


def test_install_refuses_an_optimizer_it_was_not_written_for(tmp_path, process_group):
    """The unfused inner AdamW of DeepSpeed's own path cannot take the device veto: one line that
    names the way out, before any step."""
    trainer = Trainer(tiny_run_config(str(tmp_path), "engine.zero_stage=1", "engine.fused_step=false"), 0, 1,
                      torch.device("cpu"))
    assert trainer.fused_step is None
    with pytest.raises(UnsupportedZeroOptimizer, match="set engine.fused_step=false"):
        FlatZeroStep.install(trainer.engine, max_norm=1.0)


def test_flat_step_leaves_no_gradient_hooks_and_keeps_deepspeeds_partitions(tmp_path, process_group):
    trainer = Trainer(tiny_run_config(str(tmp_path), "engine.zero_stage=2", "engine.precision=bf16"), 0, 1,
                      torch.device("cpu"))
    zero = trainer.engine.optimizer
    assert isinstance(trainer.fused_step, FlatZeroStep)
    assert zero._grad_acc_hooks == [] and not trainer.engine.enable_backward_allreduce
    # bf16 is autocast over fp32 weights, and every weight is still a view of DeepSpeed's flat buffer
    flat = zero.bit16_groups_flat[0]
    assert flat.dtype == torch.float32
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in zero.bit16_groups[0])
