"""Whole-file writes: what the user is handed is the old file or the new one, never a mix."""
import csv

import pytest

from dwnet.atomic_io import atomic_open
from dwnet.engine.run_log import RunLog


def test_atomic_open_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "labels.json"
    with atomic_open(str(path)) as fh:
        fh.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as fh:
            fh.write("half of the sec")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]  # no temporary left behind


def test_atomic_open_refuses_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic_open(str(tmp_path / "x"), "a"):
            pass


def test_metrics_csv_has_one_row_per_epoch_after_a_replayed_epoch(tmp_path):
    log = RunLog(str(tmp_path), rank=0)
    for epoch, loss in ((1, 2.0), (2, 1.5), (3, 1.2)):
        log.epoch_row(dict(epoch=epoch, step=10 * epoch, train_loss=loss))
    # a crash after epoch 3's row but before its checkpoint: the relaunch trains epochs 3.. again
    log.epoch_row(dict(epoch=3, step=30, train_loss=1.1))
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["epoch"], r["train_loss"]) for r in rows] == [("1", "2"), ("2", "1.5"), ("3", "1.1")]
    # a rollback to the end of epoch 1 trains epoch 2 again: its new row replaces the old one,
    # and epoch 3 has no row until it is trained again
    log.epoch_row(dict(epoch=2, step=20, train_loss=1.4))
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]
