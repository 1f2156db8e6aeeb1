"""What a run leaves behind on rank 0: a text log with the config and environment at the top,
a per-epoch CSV (replaced atomically and fsynced, so a crash never loses a written row), and scalars
through DeepSpeed's monitor (TensorBoard)."""
from __future__ import annotations

import csv
import logging
import os
import platform
import sys
from typing import Any

import torch
import yaml

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
