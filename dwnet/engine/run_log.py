"""What a run leaves behind on rank 0: a text log with the config and environment at the top,
a per-epoch CSV (replaced atomically and fsynced, so a crash never loses a written row), scalars
through DeepSpeed's monitor (TensorBoard) and the epoch's progress bar."""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import platform
import sys
from typing import Any
from collections.abc import Iterator

import torch
import yaml
from tqdm import tqdm

from dwnet.atomic_io import atomic_open
from dwnet.config import RunConfig
from dwnet.preflight import package_versions

CSV_FIELDS = ["epoch", "step", "precision", "lr", "train_loss", "val_top1", "val_top5", "val_loss",
              "ema_top1", "ema_top5", "skipped_steps", "world_size", "accumulation_steps", "images_per_s",
              "epoch_seconds", "note"]


class RunLog:
    def __init__(self, run_dir: str, rank: int):
        self.rank = rank
        self.run_dir = run_dir
        self.logger = logging.getLogger("dwnet")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if not self.logger.handlers:
            fmt = logging.Formatter("%(asctime)s [rank %(rank)s] %(message)s", "%H:%M:%S")
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(fmt)
            self.logger.addHandler(console)
            if rank == 0:
                os.makedirs(run_dir, exist_ok=True)
                handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)
        self.monitor = None
        self._bar: tqdm | None = None

    def info(self, msg: str, *args: Any, all_ranks: bool = False) -> None:
        if self.rank == 0 or all_ranks:
            self.logger.info(msg, *args, extra={"rank": self.rank})

    def warning(self, msg: str, *args: Any, all_ranks: bool = False) -> None:
        if self.rank == 0 or all_ranks:
            self.logger.warning(msg, *args, extra={"rank": self.rank})

    def to_file(self, msg: str, *args: Any) -> None:
        """train.log only: for what the caller also reports on the console in its own words."""
        if self.rank != 0:
            return
        record = self.logger.makeRecord(self.logger.name, logging.ERROR, __file__, 0, msg, args, None,
                                        extra={"rank": self.rank})
        for handler in self.logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)

    def header(self, cfg: RunConfig, world_size: int, precision: str, deepspeed_config: dict) -> None:
        if self.rank != 0:
            return
        env = dict(package_versions(), world_size=world_size, precision=precision,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   host=platform.node())
        self.info("environment:\n%s", yaml.safe_dump(env, sort_keys=False).rstrip())
        self.info("config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        self.info("deepspeed config: %s", deepspeed_config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank == 0 and self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(name, float(v), step) for name, v in values.items()])

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Records one epoch in metrics.csv. Rows of this epoch or later from before a crash or a
        rollback are dropped first: their epochs are being trained again, and the CSV describes the
        run that produced the weights, one row per epoch. Replaced whole (atomic_open), never torn."""
        if self.rank != 0:
            return
        path = os.path.join(self.run_dir, "metrics.csv")
        kept = []
        if os.path.isfile(path):
            with open(path, newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if int(r["epoch"]) < int(row["epoch"])]
        with atomic_open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def epoch_report(self, row: dict[str, Any], epochs: int) -> None:
        """One finished epoch: its CSV row, its scalars and its console line."""
        self.epoch_row(row)
        self.scalars(row["step"], {f"Epoch/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float)) and k != "epoch"})
        nan = float("nan")
        self.info("epoch %d/%d: train loss %.4f | val top-1 %.2f top-5 %.2f loss %.4f%s | %.0f img/s",
                  row["epoch"], epochs, row["train_loss"], row.get("val_top1", nan), row.get("val_top5", nan),
                  row.get("val_loss", nan), f" | EMA top-1 {row['ema_top1']:.2f}" if "ema_top1" in row else "",
                  row["images_per_s"])

    def eval_not_finite(self, epoch: int, losses: dict[str, float]) -> bool:
        """Warns when an evaluation loss is not finite (such an epoch cannot become best)."""
        if all(math.isfinite(v) for v in losses.values()):
            return False
        self.warning("epoch %d: evaluation loss is not finite (%s); this epoch cannot become best",
                     epoch, ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
        return True

    @contextlib.contextmanager
    def epoch_bar(self, epoch: int, total: int, initial: int, enabled: bool) -> Iterator[None]:
        """The progress bar of one epoch (rank 0, when `enabled`), closed however the epoch ends."""
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
                         disable=self.rank != 0 or not enabled)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def step_report(self, step: int, values: dict[str, float]) -> None:
        """Every log.every_steps optimizer steps: the scalars, and loss, LR and images/s on the bar."""
        self.scalars(step, values)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values['Train/loss']:.4f}", lr=f"{values['Train/lr']:.2e}",
                                  ips=f"{values['Train/images_per_s']:.0f}")
