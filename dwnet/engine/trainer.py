"""The training loop on a DeepSpeed engine: build, train, evaluate, recover.

Read top to bottom: `Trainer.__init__` finds what to resume and builds data, model, optimizer and
engine; `fit()` runs the epochs and is the one place a rollback (`RollBack`) is caught;
`_train_epoch()` is the loop and `_after_step()` what happens at each optimizer-step boundary.
Saving, restoring and rolling back belong to `dwnet.checkpoint.RunCheckpointer`, which is handed
this trainer's states and decides itself when to save; which tag to resume and how it fits this
run's ranks is `dwnet.checkpoint.resume`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable

import deepspeed
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import distribute_bn

import dwnet.models  # noqa: F401  (registers the models)
from dwnet.checkpoint.layout import checkpoint_root
from dwnet.checkpoint.progress import Progress
from dwnet.checkpoint.resume import find_resume_tag, identity, plan_resume
from dwnet.checkpoint.run_checkpointer import RollBack, RunCheckpointer, TrainingDiverged
from dwnet.config import ConfigError, RunConfig
from dwnet.data.rng import derive_key
from dwnet.data.sharding import StepLayout, check_enough_samples
from dwnet.models import build_model

from .bn_accumulation import accumulation_momentum, batchnorms
from .capture import begin_captured_step, compile_options
from .ds_config import DTYPES, build_deepspeed_config, uses_fused_step
from .ema import StepGatedEma
from .flat_zero import FlatZeroStep
from .fused_step import FusedAdamW
from .meters import EpochMeter
from .metrics import evaluate
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .run_log import RunLog
from .step_guard import StepGuard, StepOutcome, Verdict

__all__ = ["Trainer", "TrainingDiverged"]

_MODEL_RNG = 0x4D52  # key part of the per-micro-batch seed of the model's own randomness (drop-path)


class Trainer:
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
        self.checkpoints = checkpoint_root(self.run_dir)
        if device.type == "cuda":
            # Fixed input size: cuDNN's autotuned conv algorithms pay for the search after a few steps.
            torch.backends.cudnn.benchmark = True
        self.log = RunLog(self.run_dir, rank)
        if cfg.model.sync_bn and device.type == "cpu":
            raise ConfigError("model.sync_bn=true needs CUDA devices (torch SyncBatchNorm has no CPU kernel); "
                              "set model.sync_bn=false for CPU runs")
        self.progress = Progress()
        self.resume_tag = find_resume_tag(self.checkpoints, rank, world_size, self.log) \
            if cfg.checkpoint.auto_resume else None
        plan = None
        if self.resume_tag:
            plan = plan_resume(cfg, self.checkpoints, self.resume_tag, world_size, new_global_batch, switch_precision)
            if plan.accumulation_steps != cfg.optim.accumulation_steps:  # the global batch is kept
                cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
                    cfg.optim, accumulation_steps=plan.accumulation_steps))
        self.cfg = cfg
        self.layout = StepLayout.of(cfg, world_size)
        self._build_data(train_loader, val_loader)
        self.guard = StepGuard(world_size, cfg.engine.nonfinite_max_skips, cfg.engine.nonfinite_window)
        self.checkpointer = RunCheckpointer(
            self.checkpoints, rank, self.log, cfg.checkpoint.keep_last, states=self, skips=self.guard.window,
            layout=self.layout, zero_stage=cfg.engine.zero_stage, seed=cfg.engine.seed,
            every_steps=cfg.checkpoint.every_steps, steps_per_epoch=self.steps_per_epoch)
        self._unsettled: list[StepOutcome] = []  # steps whose verdict the host has not read yet
        if plan is None:
            self.build_engine(cfg.engine.precision)
        else:
            plan.announce(self.log, self.identity())
            self.checkpointer.resume(plan)
            p = self.progress
            self.log.info("resumed from %s: epoch %d, step %d of %d in it, step %d, precision %s", plan.tag,
                          p.epoch, p.step_in_epoch, self.steps_per_epoch, p.step, p.precision)
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
                channels_last=cfg.model.channels_last, layout=self.layout)
        elif self.train_loader is not None:
            check_enough_samples(self.train_loader.dataset_size, self.layout, cfg.data.train_path)
        if val_loader is None and cfg.data.val_path:
            from dwnet.data import build_val_loader

            self.val_loader = build_val_loader(cfg.data, rank=self.rank, world_size=self.world_size,
                                               device=self.device, channels_last=cfg.model.channels_last)

    @property
    def steps_per_epoch(self) -> int:
        if self.train_loader is None:
            return 0
        return self.train_loader.steps_per_epoch(self.layout)

    @property
    def dtype(self) -> torch.dtype:
        """The run's compute dtype, which inputs are cast to (bf16 at ZeRO 0-2 with the fused step:
        autocast over fp32 weights, so run `engine.module` itself under autocast)."""
        return DTYPES[self.progress.precision]

    def build_engine(self, precision: str, state_dict: dict | None = None, load_universal: bool = False) -> None:
        """A fresh model, optimizer and DeepSpeed engine in `precision`, which becomes the run's."""
        cfg = self.cfg
        torch.manual_seed(cfg.engine.seed)  # identical initial weights on every rank
        model = self.model_factory(cfg)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.ema = StepGatedEma(model, decay=cfg.engine.ema_decay, device=self.device) if cfg.engine.ema else None
        self.lrs = scaled_lrs(cfg.optim, self.layout.global_batch)
        fused = uses_fused_step(cfg.engine, precision)
        optimizer = build_optimizer(model, cfg.optim, self.lrs, fused_step=fused, zero_stage=cfg.engine.zero_stage)
        self.progress.precision = precision
        self.ds_config = build_deepspeed_config(cfg, self.world_size, precision)
        if load_universal:  # read only by load_checkpoint: saves stay in the ordinary format
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        # The fused step's device verdict (FusedAdamW, FlatZeroStep), or None: DeepSpeed's host bool.
        self.fused_step: FusedAdamW | FlatZeroStep | None = None
        if isinstance(optimizer, FusedAdamW):
            optimizer.attach(self.engine)
            self.fused_step = optimizer
        elif fused:
            self.fused_step = FlatZeroStep.install(self.engine, max_norm=cfg.optim.grad_clip)
        self.batchnorms = batchnorms(self.engine.module)
        self.captured = False
        if cfg.model.compile:
            options, not_captured = compile_options(cfg.model.compile_mode, self.device, cfg.engine.zero_stage)
            if not_captured:
                self.log.info("%s", not_captured)
            # DeepSpeed's wrapper around torch.compile, aware of ZeRO hooks
            self.engine.compile(compile_kwargs=options)
            self.captured = options.get("mode") == "reduce-overhead"
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.lrs, max(self.steps_per_epoch, 1))
        self.position_schedule()
        self.log.monitor = getattr(self.engine, "monitor", None)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, f"ds_config_{precision}.json"), "w") as fh:
                json.dump(self.ds_config, fh, indent=2)
        self.log.header(cfg, self.world_size, precision, self.ds_config)

    def position_schedule(self) -> None:
        self.scheduler.step_update(self.progress.schedule_position(max(self.steps_per_epoch, 1)))

    def identity(self) -> dict:
        """What a checkpoint of this run records about it (saved in COMPLETE)."""
        samples = self.train_loader.dataset_size if self.train_loader is not None else 0
        return identity(self.cfg, self.world_size, samples)

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
                      cfg.model.name, cfg.optim.epochs, self.steps_per_epoch, self.layout.global_batch,
                      self.lrs.base, self.lrs.warmup, self.lrs.min, self.progress.precision, cfg.engine.zero_stage)
        last_eval: dict = {}
        while self.progress.epoch < cfg.optim.epochs:
            try:
                last_eval = self._end_of_epoch(self._train_epoch())
            except RollBack as rollback:  # the epoch loop restarts from the restored position
                self._roll_back(rollback.why)
        return last_eval

    def _roll_back(self, why: str) -> None:
        self.checkpointer.roll_back(why)

    def _train_epoch(self) -> dict:
        """The rest of the current epoch, from `progress.step_in_epoch`; its stats."""
        cfg, p = self.cfg, self.progress
        accum = self.layout.accumulation_steps
        start = p.step_in_epoch
        self.engine.train()
        meter = EpochMeter(self.device, self.world_size)
        micro = 0
        with self.log.epoch_bar(p.epoch, self.steps_per_epoch, start, enabled=cfg.log.progress), \
                contextlib.closing(self.train_loader.epoch(p.epoch, start, layout=self.layout)) as batches:
            for images, targets in batches:
                meter.data_arrived()
                self._seed_model_randomness(micro)
                loss = self.micro_step(images, targets, micro_batch=micro)
                meter.add(loss, images.shape[0])
                micro = (micro + 1) % accum
                if micro == 0:
                    self._after_step(loss, meter)
                meter.waiting_for_data()
        if meter.micro_batches == 0 and start < self.steps_per_epoch:
            raise RuntimeError(f"epoch {p.epoch}: the train loader yielded no batches")
        return meter.epoch_stats()

    def _seed_model_randomness(self, micro: int) -> None:
        """Drop-path draws keyed on the micro-batch's place in the epoch, not on this rank's stream:
        the same micro-batch gets the same masks on any number of ranks."""
        p = self.progress
        micro_id = self.layout.micro_batch_id(p.step_in_epoch, self.rank, micro)
        torch.manual_seed(derive_key(_MODEL_RNG, self.cfg.engine.seed, p.epoch, micro_id) & 0x7FFFFFFFFFFFFFFF)

    def _after_step(self, loss: torch.Tensor, meter: EpochMeter) -> None:
        """The optimizer-step boundary: keep or skip the step, RollBack on persistent trouble, log,
        and let the checkpointer save when one is due. The verdicts are read at logging and saving
        steps and at the end of the epoch, all since the last read at once: in between the host
        never waits for the device (a skipped step has changed nothing either way)."""
        p = self.progress
        self._unsettled.append(self.finish_step())
        self.log.step_done()
        logging = p.step % self.cfg.log.every_steps == 0
        if logging or self.checkpointer.save_due(p.step):
            self._settle_steps()
        if logging:
            self._log_step(loss, meter)
        self.checkpointer.maybe_save(p.step)

    def _settle_steps(self) -> None:
        """Reads the verdicts of the steps since the last read (one host sync) and acts on them in
        step order: a warning per skipped step, RollBack when the skips have become too many."""
        outcomes, self._unsettled = self._unsettled, []
        window = self.cfg.engine.nonfinite_window
        for outcome in self.guard.settle(outcomes):
            if outcome.skipped:
                self.log.warning("step %d skipped: %s; parameters, optimizer state, BatchNorm statistics and EMA "
                                 "are unchanged (%d skipped in the last %d steps)", outcome.step, outcome.reason(),
                                 outcome.skips_in_window, window)
            if outcome.verdict is Verdict.ROLLBACK:
                raise RollBack(f"{outcome.skips_in_window} non-finite steps within {window} steps at step "
                               f"{outcome.step}")

    def _log_step(self, loss: torch.Tensor, meter: EpochMeter) -> None:
        ips, data_fraction = meter.interval()
        grad_norm = self.engine.get_global_grad_norm()
        self.log.step_report(self.progress.step, {
            "Train/loss": loss.item(), "Train/lr": self.optimizer.param_groups[0]["lr"],
            "Train/skipped_steps": self.guard.total_skipped,
            "Train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "Train/images_per_s": ips, "Train/data_time_fraction": data_fraction, **self._memory_scalars()})

    def micro_step(self, images: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> torch.Tensor:
        """Forward and backward of micro-batch `micro_batch` (0-based) of the current optimizer step;
        DeepSpeed applies the update after the last one. Returns the detached loss."""
        if micro_batch == 0:
            self.guard.begin(self.engine.module)  # the buffers as they were before this step
            begin_captured_step(self.captured)  # not between micro-batches: their gradients add up
        with accumulation_momentum(self.batchnorms, micro_batch, self.cfg.optim.accumulation_steps):
            logits = self.engine(images.to(self.dtype))
        loss = self.loss_fn(logits, targets)
        last = micro_batch == self.cfg.optim.accumulation_steps - 1
        self.engine.backward(self.guard.loss_for_backward(loss, last_micro_batch=last))
        self.engine.step()
        return loss.detach()

    def finish_step(self) -> StepOutcome:
        """Collective, after the step's last micro_step: counts the step, decides on every rank
        at once whether it was kept (a skipped one has changed nothing), moves the LR schedule, and
        updates the EMA unless the step was skipped, all on the device; the outcome is read when
        asked (`StepGuard.settle` also gives the skip window's verdict)."""
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        outcome = self.guard.end(self._step_not_applied(), p.step)
        self.position_schedule()
        if self.ema is not None:
            self.ema.update_unless_skipped(self.engine.module, p.step, outcome.skipped_on_device)
        return outcome

    def _step_not_applied(self) -> torch.Tensor | bool:
        """The optimizer's own verdict on the step just taken: the fused step's device flag, or the
        host bool DeepSpeed's ZeRO-3 / low-precision optimizers keep."""
        if self.fused_step is not None:
            return self.fused_step.step_skipped
        return not self.engine.was_step_applied()

    def _memory_scalars(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"Memory/allocated_gb": torch.cuda.memory_allocated() / 2**30,
                    "Memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
        return {}

    def _end_of_epoch(self, stats: dict) -> dict:
        """Evaluates, records and saves the finished epoch; RollBack if the model is not finite."""
        self._settle_steps()  # the epoch's last verdicts, before anything is judged or saved
        p = self.progress
        p.epoch += 1
        p.step_in_epoch = 0
        # Checked before BN statistics are averaged over ranks, which would spread a poisoned one.
        if self.checkpointer.model_not_finite():
            raise RollBack(f"the model was not finite at the end of epoch {p.epoch} (step {p.step})")
        results = self.evaluate_all()
        top1 = results.get("val_top1", -1.0)
        eval_not_finite = self.log.eval_not_finite(p.epoch, {k: v for k, v in results.items() if k.endswith("_loss")})
        note = "non-finite eval loss: not a best candidate" if eval_not_finite else ""
        is_best = top1 > p.best_top1 and not note
        if is_best:
            p.best_top1 = top1
        row = dict(epoch=p.epoch, step=p.step, precision=p.precision, lr=self.optimizer.param_groups[0]["lr"],
                   skipped_steps=self.guard.total_skipped, world_size=self.world_size,
                   accumulation_steps=self.cfg.optim.accumulation_steps, note=note, **stats, **results)
        self.log.epoch_report(row, self.cfg.optim.epochs)
        self.checkpointer.save_epoch(is_best)
        return row

    # ---- evaluation -----------------------------------------------------------------------
    def sync_batchnorm_statistics(self) -> None:
        """Ranks see different batches, so their BN running statistics drift apart; average them,
        and the EMA's, which are lerped from each rank's own (a save keeps rank 0's copy of both;
        the EMA being linear, averaging it equals the EMA of the averaged statistics)."""
        if self.world_size > 1 and not self.cfg.model.sync_bn:
            distribute_bn(self.engine.module, self.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.world_size, reduce=True)

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
