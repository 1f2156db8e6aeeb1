"""The engine's own work per optimizer step, counted in operator calls (bench/host_overhead.py):
at ZeRO 0-2, in fp32 and bf16, it is at most 1.25x plain PyTorch's, grows with depth no faster than
the model's own, and never makes the host read a device value. Counts, not times: the same on a
loaded machine. One rank: the flat ZeRO step's collectives (two per parameter group) are not
counted, and they do not grow with depth either."""
from __future__ import annotations

import os
import sys

import pytest

# Appended, not prepended: bench/data_prep.py would otherwise hide the data_prep package from later tests.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import host_overhead  # noqa: E402


STAGES = [0, 1, 2]


@pytest.fixture(scope="module")
def rows(process_group):
    return host_overhead.measure(STAGES, ["fp32", "bf16"], host_overhead.DEPTHS)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_step_costs_no_more_than_plain_pytorch(rows, precision, stage):
    case = [r for r in rows if r["precision"] == precision and r["stage"] == stage]
    assert len(case) == len(host_overhead.DEPTHS)
    for r in case:
        assert r["ratio"] <= host_overhead.TARGET, r
        assert r["engine_syncs"] == 0, f"the step read a device value on the host: {r}"
    grown = host_overhead.growth(case)[(precision, stage, "fused")]
    assert grown["engine"] <= grown["plain"], f"engine overhead grows with the number of parameter tensors: {grown}"


def test_counter_sees_per_tensor_work_and_host_reads():
    """The counter itself: a per-tensor loop costs an operator call per tensor, a fused one does
    not, and .item() / bool() count as host reads."""
    import torch

    tensors = [torch.ones(3) for _ in range(50)]
    per_tensor = host_overhead.count_ops(lambda: [t.mul_(1.0) for t in tensors], warmup=0)
    fused = host_overhead.count_ops(lambda: torch._foreach_mul_(tensors, 1.0), warmup=0)
    reads = host_overhead.count_ops(lambda: (tensors[0].sum().item(), bool(tensors[1].all())), warmup=0)
    assert per_tensor == {"ops": 50, "syncs": 0}
    assert fused == {"ops": 1, "syncs": 0}
    assert reads["syncs"] == 2
