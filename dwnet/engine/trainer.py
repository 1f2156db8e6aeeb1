"""The training loop on a DeepSpeed engine: build, train, evaluate, checkpoint, resume, recover.

Read top to bottom: `Trainer.__init__` finds what to resume and builds data, model, optimizer and
engine; `fit()` runs the epochs; `_train_epoch()` is the loop and `_after_step()` what happens at
each optimizer-step boundary; the rest are the pieces they call. Which tag to resume and how it fits
this run's ranks is `resume.py`; saving, restoring and rolling back the run's state is `run_state.py`
(a mixin of this class); the checkpoint files are `checkpointing.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import deepspeed
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import distribute_bn
from tqdm import tqdm

import dwnet.models  # noqa: F401  (registers the models)
from dwnet.config import ConfigError, RunConfig, global_batch_size
from dwnet.data.rng import derive_key
from dwnet.data.sharding import StepLayout
from dwnet.models import build_model

from . import checkpointing, resume
from .bn_accumulation import accumulation_momentum, batchnorms
from .ds_config import DTYPES, build_deepspeed_config, uses_fused_step
from .ema import StepGatedEma
from .fused_step import FusedAdamW
from .meters import EpochMeter
from .metrics import evaluate
from .nonfinite import NonFiniteGuard, Verdict
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .progress import Progress
from .run_log import RunLog
from .run_state import RunState, TrainingDiverged  # noqa: F401  (TrainingDiverged: part of this module's interface)
from .step_guard import StepGuard, StepOutcome

_MODEL_RNG = 0x4D52  # key part of the per-micro-batch seed of the model's own randomness (drop-path)


class Trainer(RunState):
    """Trains `cfg` on this rank. Loaders and the model factory can be passed in (tests, notebooks);
    by default they come from `dwnet.data` and `build_model`. `switch_precision` lets a resume
    change an fp32 checkpoint to a lower engine.precision (train.py --switch-precision);
    `new_global_batch` lets it continue with another global batch (train.py --new-global-batch)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: torch.device,
                 train_loader=None, val_loader=None,
                 model_factory: Callable[[RunConfig], nn.Module] = build_model, switch_precision: bool = False,
                 new_global_batch: bool = False):
        self.model_factory = model_factory
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.run_dir = cfg.checkpoint.dir
        self.checkpoints = checkpointing.checkpoint_root(self.run_dir)
        if device.type == "cuda":
            # Fixed input size: cuDNN's autotuned conv algorithms pay for the search after a few steps.
            torch.backends.cudnn.benchmark = True
        self.log = RunLog(self.run_dir, rank)
        if cfg.model.sync_bn and device.type == "cpu":
            raise ConfigError("model.sync_bn=true needs CUDA devices (torch SyncBatchNorm has no CPU kernel); "
                              "set model.sync_bn=false for CPU runs")
        self.progress = Progress(precision=cfg.engine.precision)
        self.resume_tag = resume.find_resume_tag(self.checkpoints, rank, world_size, self.log) \
            if cfg.checkpoint.auto_resume else None
        plan = None
        if self.resume_tag:
            plan = resume.plan_resume(cfg, self.checkpoints, self.resume_tag, world_size, new_global_batch)
            if plan.accumulation_steps != cfg.optim.accumulation_steps:  # the global batch is kept
                cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
                    cfg.optim, accumulation_steps=plan.accumulation_steps))
        self.cfg = cfg
        self.layout = StepLayout(cfg.data.batch_size, world_size, cfg.optim.accumulation_steps)
        self._build_data(train_loader, val_loader)
        self.guard = NonFiniteGuard(cfg.engine.nonfinite_max_skips, cfg.engine.nonfinite_window)
        self.step_guard = StepGuard(world_size)
        self._unsettled: list[StepOutcome] = []  # steps whose verdict the host has not read yet
        if plan is None:
            self._build_engine(self.progress.precision)
        else:
            self._resume(plan, switch_precision)
        self.progress.record_layout(world_size, cfg.optim.accumulation_steps, cfg.engine.zero_stage)

    # ---- construction ---------------------------------------------------------------------
    def _build_data(self, train_loader, val_loader) -> None:
        cfg = self.cfg
        self.train_loader, self.val_loader = train_loader, val_loader
        if train_loader is None and cfg.data.train_path:
            from dwnet.data import build_train_loader

            self.train_loader = build_train_loader(
                cfg.data, cfg.augment, num_classes=cfg.model.num_classes, rank=self.rank,
                world_size=self.world_size, seed=cfg.engine.seed, device=self.device,
                channels_last=cfg.model.channels_last)
        if self.train_loader is not None and self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.train_path={cfg.data.train_path}: {self.train_loader.dataset_size} samples, fewer than one "
                f"global batch of {self.layout.global_batch} (data.batch_size={cfg.data.batch_size} x "
                f"{self.world_size} ranks x optim.accumulation_steps={cfg.optim.accumulation_steps}); lower "
                "data.batch_size or optim.accumulation_steps")
        if val_loader is None and cfg.data.val_path:
            from dwnet.data import build_val_loader

            self.val_loader = build_val_loader(cfg.data, rank=self.rank, world_size=self.world_size,
                                               device=self.device, channels_last=cfg.model.channels_last)

    @property
    def steps_per_epoch(self) -> int:
        if self.train_loader is None:
            return 0
        return self.train_loader.steps_per_epoch(self.cfg.optim.accumulation_steps)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.progress.precision]

    def _build_engine(self, precision: str, state_dict: dict | None = None, load_universal: bool = False) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.engine.seed)  # identical initial weights on every rank
        model = self.model_factory(cfg)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.ema = StepGatedEma(model, decay=cfg.engine.ema_decay, device=self.device) if cfg.engine.ema else None
        self.lrs = scaled_lrs(cfg.optim, global_batch_size(cfg, self.world_size))
        optimizer = build_optimizer(model, cfg.optim, self.lrs,
                                    fused_step=uses_fused_step(cfg.engine.zero_stage, precision))
        self.progress.precision = precision
        self.ds_config = build_deepspeed_config(cfg, self.world_size, precision)
        if load_universal:  # read only by load_checkpoint: saves stay in the ordinary format
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.loads_universal = load_universal
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        if isinstance(optimizer, FusedAdamW):
            optimizer.attach(self.engine)
        self.batchnorms = batchnorms(self.engine.module)
        if cfg.model.compile:
            self.engine.compile()  # DeepSpeed's wrapper around torch.compile, aware of ZeRO hooks
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.lrs, max(self.steps_per_epoch, 1))
        self._position_schedule()
        self.log.monitor = getattr(self.engine, "monitor", None)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, f"ds_config_{precision}.json"), "w") as fh:
                json.dump(self.ds_config, fh, indent=2)
        self.log.header(cfg, self.world_size, precision, self.ds_config)

    def _position_schedule(self) -> None:
        self.scheduler.step_update(self.progress.schedule_position(max(self.steps_per_epoch, 1)))

    # ---- resume ---------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint of this run records about it (saved in COMPLETE)."""
        samples = self.train_loader.dataset_size if self.train_loader is not None else 0
        return resume.identity(self.cfg, self.world_size, samples)

    def _resume(self, plan: resume.ResumePlan, switch_precision: bool) -> None:
        """Builds the engine holding `plan.tag` (in the precision the run continues in) and says so."""
        tag, saved, mine = plan.tag, plan.saved, self.identity()
        for line in plan.announcements:
            self.log.info("resuming %s: %s", tag, line)
        if saved and saved.get("train_samples", mine["train_samples"]) != mine["train_samples"]:
            self.log.warning("resuming %s with %d training samples (saved with %d): the training data changed",
                             tag, mine["train_samples"], saved["train_samples"])
        if saved and mine["epochs"] > saved.get("epochs", mine["epochs"]):
            self.log.info("optim.epochs raised from %d to %d: the LR schedule continues on the longer cosine",
                          saved["epochs"], mine["epochs"])
        saved_precision = checkpointing.read_meta(self.checkpoints, tag).get("precision", self.cfg.engine.precision)
        precision = resume.resume_precision(self.cfg.engine.precision, saved_precision, switch_precision, tag,
                                            self.log)
        if precision != saved_precision:
            self._restore_in_precision(tag, precision)
        else:
            self._build_engine(precision, load_universal=plan.reshard)
            self._restore(tag)
        # A crash does not close a non-finite episode: tags saved after the resume stay marked.
        self.guard.skipped_steps.extend(self.progress.recent_skips)
        p = self.progress
        self.log.info("resumed from %s: epoch %d, step %d of %d in it, step %d, precision %s", tag, p.epoch,
                      p.step_in_epoch, self.steps_per_epoch, p.step, p.precision)

    @property
    def finished(self) -> bool:
        return self.progress.epoch >= self.cfg.optim.epochs

    def finished_message(self) -> str:
        return (f"run already finished (epoch {self.progress.epoch} of {self.cfg.optim.epochs}); "
                "raise optim.epochs to continue")

    # ---- training -------------------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the engine dtype: bf16 logits lose the small differences CE needs.
        logits = logits.float()
        if targets.ndim == 2:
            return SoftTargetCrossEntropy()(logits, targets)
        return nn.functional.cross_entropy(logits, targets, label_smoothing=self.cfg.augment.label_smoothing)

    def fit(self) -> dict:
        if self.train_loader is None:
            raise ConfigError("data.train_path is empty; set it to the train .beton (or ImageFolder dir)")
        cfg = self.cfg
        self.log.info("training %s: %d epochs x %d steps, global batch %d, lr %.3g (warmup %.3g, min %.3g), %s, ZeRO-%d",
                      cfg.model.name, cfg.optim.epochs, self.steps_per_epoch, global_batch_size(cfg, self.world_size),
                      self.lrs.base, self.lrs.warmup, self.lrs.min, self.progress.precision, cfg.engine.zero_stage)
        last_eval: dict = {}
        while self.progress.epoch < cfg.optim.epochs:
            epoch_stats = self._train_epoch()
            # None: rolled back, and the epoch loop restarts from the restored position.
            row = self._end_of_epoch(epoch_stats) if epoch_stats is not None else None
            if row is not None:
                last_eval = row
        return last_eval

    def _train_epoch(self) -> dict | None:
        """The rest of the current epoch, from `progress.step_in_epoch`; its stats, or None if it
        rolled back (the epoch loop then restarts from the restored position)."""
        cfg, p = self.cfg, self.progress
        accum = cfg.optim.accumulation_steps
        start = p.step_in_epoch
        self.engine.train()
        bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {p.epoch}", dynamic_ncols=True,
                   leave=False, disable=self.rank != 0 or not cfg.log.progress)
        meter = EpochMeter(self.device, self.world_size)
        micro = 0
        for images, targets in self.train_loader.epoch(p.epoch, start, accumulation_steps=accum):
            meter.data_arrived()
            self._seed_model_randomness(micro)
            loss = self.micro_step(images, targets, micro_batch=micro)
            meter.add(loss, images.shape[0])
            micro = (micro + 1) % accum
            if micro == 0:
                bar.update(1)
                if not self._after_step(loss, meter, bar):
                    bar.close()
                    return None
            meter.waiting_for_data()
        bar.close()
        if meter.micro_batches == 0 and start < self.steps_per_epoch:
            raise RuntimeError(f"epoch {p.epoch}: the train loader yielded no batches")
        return meter.epoch_stats()

    def _seed_model_randomness(self, micro: int) -> None:
        """Drop-path draws keyed on the micro-batch's place in the epoch, not on this rank's stream:
        the same micro-batch gets the same masks on any number of ranks."""
        p = self.progress
        micro_id = self.layout.micro_batch_id(p.step_in_epoch, self.rank, micro)
        torch.manual_seed(derive_key(_MODEL_RNG, self.cfg.engine.seed, p.epoch, micro_id) & 0x7FFFFFFFFFFFFFFF)

    def _after_step(self, loss: torch.Tensor, meter: EpochMeter, bar: tqdm) -> bool:
        """The optimizer-step boundary: keep or skip the step, roll back on persistent trouble, log,
        save periodically. False when it rolled back. The verdicts are read at logging and saving
        steps and at the end of the epoch, all since the last read at once: the host never waits
        for the device in between (a skipped step has changed nothing either way)."""
        cfg, p = self.cfg, self.progress
        self._unsettled.append(self.finish_step())
        saving = bool(cfg.checkpoint.every_steps) and p.step % cfg.checkpoint.every_steps == 0 \
            and p.step_in_epoch < self.steps_per_epoch
        if (p.step % cfg.log.every_steps == 0 or saving or p.step_in_epoch >= self.steps_per_epoch) \
                and not self._settle_steps():
            return False
        if p.step % cfg.log.every_steps == 0:
            self._log_step(loss, meter, bar)
        if saving and self.save() is None:
            self._roll_back(f"the model was not finite at step {p.step} (checkpoint not written)")
            return False
        return True

    def _settle_steps(self) -> bool:
        """Reads the verdicts of the steps since the last read (one host sync) and acts on them in
        order: a warning per skipped step, the skip window, the roll back. False when it rolled back."""
        cfg, outcomes, self._unsettled = self.cfg, self._unsettled, []
        StepOutcome.settle_all(outcomes)
        for outcome in outcomes:
            step = outcome.step
            verdict = self.guard.record(step, applied=not outcome.skipped)
            if outcome.skipped:
                self.log.warning("step %d skipped: %s; parameters, optimizer state, BatchNorm statistics and EMA "
                                 "are unchanged (%d skipped in the last %d steps)", step, outcome.reason(),
                                 self.guard.skips_in_window(step), cfg.engine.nonfinite_window)
            if verdict is Verdict.ROLLBACK:
                self._roll_back(f"{self.guard.skips_in_window(step)} non-finite steps within "
                                f"{cfg.engine.nonfinite_window} steps at step {step}")
                return False
        return True

    def _log_step(self, loss: torch.Tensor, meter: EpochMeter, bar: tqdm) -> None:
        ips, data_fraction = meter.interval()
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self.engine.get_global_grad_norm()
        self.log.scalars(self.progress.step, {
            "Train/loss": loss.item(), "Train/lr": lr, "Train/skipped_steps": self.guard.total_skipped,
            "Train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "Train/images_per_s": ips, "Train/data_time_fraction": data_fraction, **self._memory_scalars()})
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")

    def micro_step(self, images: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> torch.Tensor:
        """Forward and backward of micro-batch `micro_batch` (0-based) of the current optimizer step;
        DeepSpeed applies the update after the last one. Returns the detached loss."""
        if micro_batch == 0:
            self.step_guard.begin(self.engine.module)  # the buffers as they were before this step
        with accumulation_momentum(self.batchnorms, micro_batch, self.cfg.optim.accumulation_steps):
            logits = self.engine(images.to(self.dtype))
        loss = self.loss_fn(logits, targets)
        last = micro_batch == self.cfg.optim.accumulation_steps - 1
        self.engine.backward(self.step_guard.loss_for_backward(loss, last_micro_batch=last))
        self.engine.step()
        return loss.detach()

    def finish_step(self) -> StepOutcome:
        """Collective, after the step's last micro_step: counts the step, decides on every rank
        at once whether it was kept (a skipped one has changed nothing), moves the LR schedule,
        and updates the EMA if the step was kept."""
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        outcome = self.step_guard.end(self._step_not_applied(), p.step)
        self._position_schedule()
        if self.ema is not None:
            self.ema.update_unless_skipped(self.engine.module, p.step, outcome.skipped_on_device)
        return outcome

    def _step_not_applied(self) -> torch.Tensor | bool:
        """The optimizer's own verdict on the step just taken: FusedAdamW's device flag, or the
        host bool DeepSpeed's ZeRO / low-precision optimizers keep."""
        if isinstance(self.optimizer, FusedAdamW):
            return self.optimizer.step_skipped
        return not self.engine.was_step_applied()

    def _memory_scalars(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"Memory/allocated_gb": torch.cuda.memory_allocated() / 2**30,
                    "Memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
        return {}

    def _end_of_epoch(self, stats: dict) -> dict | None:
        """Evaluates, records and saves the finished epoch; None if it rolled back instead."""
        p = self.progress
        p.epoch += 1
        p.step_in_epoch = 0
        # Checked before BN statistics are averaged over ranks, which would spread a poisoned one.
        if self._model_not_finite():
            self._roll_back(f"the model was not finite at the end of epoch {p.epoch} (step {p.step})")
            return None
        results = self.evaluate_all()
        top1 = results.get("val_top1", -1.0)
        losses = {k: v for k, v in results.items() if k.endswith("_loss")}
        note = ""
        if not all(math.isfinite(v) for v in losses.values()):
            note = "non-finite eval loss: not a best candidate"
            self.log.warning("epoch %d: evaluation loss is not finite (%s); this epoch cannot become best",
                             p.epoch, ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
        is_best = top1 > p.best_top1 and not note
        if is_best:
            p.best_top1 = top1
        row = dict(epoch=p.epoch, step=p.step, precision=p.precision, lr=self.optimizer.param_groups[0]["lr"],
                   skipped_steps=self.guard.total_skipped, world_size=self.world_size,
                   accumulation_steps=self.cfg.optim.accumulation_steps, note=note, **stats, **results)
        self.log.epoch_row(row)
        self.log.scalars(p.step, {f"Epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"})
        self.log.info("epoch %d/%d: train loss %.4f | val top-1 %.2f top-5 %.2f loss %.4f%s | %.0f img/s",
                      p.epoch, self.cfg.optim.epochs, stats["train_loss"], results.get("val_top1", float("nan")),
                      results.get("val_top5", float("nan")), results.get("val_loss", float("nan")),
                      f" | EMA top-1 {results['ema_top1']:.2f}" if "ema_top1" in results else "", stats["images_per_s"])
        if self.save(is_best=is_best) is None:
            self._roll_back(f"the model was not finite at the end of epoch {p.epoch} (checkpoint not written)")
            return None
        return row

    # ---- evaluation -----------------------------------------------------------------------
    def sync_batchnorm_statistics(self) -> None:
        """Ranks see different batches, so their BN running statistics drift apart; average them."""
        if self.world_size > 1 and not self.cfg.model.sync_bn:
            distribute_bn(self.engine.module, self.world_size, reduce=True)

    def evaluate_all(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        self.sync_batchnorm_statistics()
        self.engine.eval()
        results = {f"val_{k}": v for k, v in evaluate(self.engine, self.val_loader, self.device, self.dtype).items()}
        if self.ema is not None:
            self.ema.module.eval()
            ema = evaluate(self.ema.module, self.val_loader, self.device, torch.float32)
            results.update({"ema_top1": ema["top1"], "ema_top5": ema["top5"], "ema_loss": ema["loss"]})
        self.engine.train()
        return results
