"""The training loop on a DeepSpeed engine: build, train, evaluate, checkpoint, resume, recover.

Read top to bottom: `Trainer.__init__` builds model, data, optimizer and engine; `fit()` runs the
epochs; `_train_epoch()` is the loop; the rest are the pieces it calls.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, distribute_bn
from tqdm import tqdm

import dwnet.models  # noqa: F401  (registers the models)
from dwnet.config import ConfigError, RunConfig, global_batch_size
from dwnet.errors import UserError
from dwnet.models import build_model

from . import checkpointing
from .ds_config import build_deepspeed_config
from .export import consolidated_state_dict, read_client_state
from .finite import nonfinite_on_any_rank, preview
from .metrics import evaluate
from .nonfinite import NonFiniteGuard, Verdict
from .optim import build_optimizer, build_scheduler, scaled_lrs
from .run_log import RunLog
from .step_guard import StepGuard, StepOutcome

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ResumeMismatchError(UserError):
    """The checkpoint to resume belongs to another model or batch setting; one line naming both values."""


class TrainingDiverged(RuntimeError):
    """Non-finite steps persisted after the fallback (or there is no clean checkpoint to return
    to): the run stops instead of burning compute. The message is one line saying what to change."""


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint and restored on resume."""
    epoch: int = 0
    batch_in_epoch: int = 0  # next micro-batch of `epoch` to run
    step: int = 0  # optimizer steps taken (skipped ones included)
    best_top1: float = -1.0
    precision: str = "fp32"
    fallbacks: int = 0
    history: list = field(default_factory=list)  # precision switches, for the record
    recent_skips: list = field(default_factory=list)  # skipped steps in the guard's window at save time


class Trainer:
    """Trains `cfg` on this rank. Loaders and the model factory can be passed in (tests, notebooks);
    by default they come from `dwnet.data` and `build_model`. `switch_precision` lets a resume
    change an fp32 checkpoint to a lower engine.precision (train.py --switch-precision)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: torch.device,
                 train_loader=None, val_loader=None,
                 model_factory: Callable[[RunConfig], nn.Module] = build_model, switch_precision: bool = False):
        self.cfg = cfg
        self.model_factory = model_factory
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.run_dir = cfg.checkpoint.dir
        if device.type == "cuda":
            # Fixed input size: cuDNN's autotuned conv algorithms pay for the search after a few steps.
            torch.backends.cudnn.benchmark = True
        self.log = RunLog(self.run_dir, rank)
        if cfg.model.sync_bn and device.type == "cpu":
            raise ConfigError("model.sync_bn=true needs CUDA devices (torch SyncBatchNorm has no CPU kernel); "
                              "set model.sync_bn=false for CPU runs")
        self.progress = Progress(precision=cfg.engine.precision)
        self.switch_precision = switch_precision
        self.resume_tag = self._find_resume_tag()
        self._build_data(train_loader, val_loader)
        saved_precision = cfg.engine.precision
        if self.resume_tag:
            meta = checkpointing.read_meta(checkpointing.checkpoint_root(self.run_dir), self.resume_tag)
            self._check_identity(self.resume_tag, meta.get(checkpointing.IDENTITY))
            saved_precision = meta.get("precision", cfg.engine.precision)
            self.progress.precision = self._resume_precision(self.resume_tag, saved_precision)
        self.guard = NonFiniteGuard(cfg.engine.nonfinite_max_skips, cfg.engine.nonfinite_window)
        self.step_guard = StepGuard(world_size)
        if self.resume_tag and saved_precision != self.progress.precision:
            self._restore_in_precision(self.resume_tag, self.progress.precision)  # builds the engine
        else:
            self._build_engine(self.progress.precision)
            if self.resume_tag:
                self._restore(self.resume_tag)
        if self.resume_tag:
            self._resume()

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
        if self.train_loader is not None and len(self.train_loader) < cfg.optim.accumulation_steps:
            raise ConfigError(
                f"data.train_path={cfg.data.train_path}: {len(self.train_loader)} batches per rank per epoch, "
                f"fewer than optim.accumulation_steps={cfg.optim.accumulation_steps}; lower data.batch_size")
        if val_loader is None and cfg.data.val_path:
            from dwnet.data import build_val_loader

            self.val_loader = build_val_loader(cfg.data, rank=self.rank, world_size=self.world_size,
                                               device=self.device, channels_last=cfg.model.channels_last)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader) // self.cfg.optim.accumulation_steps if self.train_loader else 0

    def _build_engine(self, precision: str, state_dict: dict | None = None) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.engine.seed)  # identical initial weights on every rank
        model = self.model_factory(cfg)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        self.ema = ModelEmaV3(model, decay=cfg.engine.ema_decay, device=self.device) if cfg.engine.ema else None
        self.lrs = scaled_lrs(cfg.optim, global_batch_size(cfg, self.world_size))
        optimizer = build_optimizer(model, cfg.optim, self.lrs)
        self.ds_config = build_deepspeed_config(cfg, self.world_size, precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        if cfg.model.compile:
            self.engine.compile()  # DeepSpeed's wrapper around torch.compile, aware of ZeRO hooks
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.lrs, max(self.steps_per_epoch, 1))
        self.scheduler.step_update(self.progress.step)
        self.dtype = DTYPES[precision]
        self.progress.precision = precision
        self.log.monitor = getattr(self.engine, "monitor", None)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, f"ds_config_{precision}.json"), "w") as fh:
                json.dump(self.ds_config, fh, indent=2)
        self.log.header(cfg, self.world_size, precision, self.ds_config)

    # ---- resume ---------------------------------------------------------------------------
    def _find_resume_tag(self) -> str | None:
        """Collective. The newest complete tag whose files all read back; damaged newer ones are
        moved aside (`step_N.damaged`) with one line each, so a bad disk block never blocks a run."""
        if not self.cfg.checkpoint.auto_resume:
            return None
        root = checkpointing.checkpoint_root(self.run_dir)
        if self.rank == 0 and os.path.isdir(root):
            removed = checkpointing.remove_incomplete(root)
            if removed:
                self.log.info("removed incomplete checkpoint tags (saves cut short): %s", ", ".join(removed))
            for name in checkpointing.repair_pointers(root):
                self.log.warning("%s: damaged or stale pointer file, rebuilt from the tags", os.path.join(root, name))
        while True:
            tag = self._agreed_newest_tag(root)
            if tag is None:
                return None
            problem = self._verify_on_all_ranks(root, tag)
            if problem is None:
                return tag
            if self.rank == 0:
                moved = checkpointing.move_aside(root, tag)
                self.log.warning("checkpoint %s is damaged (%s): moved aside to %s, resuming from the previous "
                                 "complete tag", tag, problem, moved)
            if dist.is_initialized():
                dist.barrier()  # every rank sees the rename before looking for the next tag

    def _agreed_newest_tag(self, root: str) -> str | None:
        tag = checkpointing.newest_complete_tag(root)
        # Every rank must agree (a node with a stale shared-filesystem view would otherwise diverge).
        if dist.is_initialized():
            tags = [None] * self.world_size
            dist.all_gather_object(tags, tag)
            if len(set(tags)) != 1:
                raise RuntimeError(f"ranks see different newest checkpoints in {root}: {tags}; "
                                   "the checkpoint directory must be one shared path")
        return tag

    def _verify_on_all_ranks(self, root: str, tag: str) -> str | None:
        """Collective: the ranks split the tag's files, check them, and all get the first problem
        found, so that all take the same decision (and none enters a load the others skip)."""
        problem = checkpointing.verify_tag(root, tag, self.rank, self.world_size)
        if not dist.is_initialized():
            return problem
        problems = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def identity(self) -> dict:
        """What a checkpoint of this run must match to be resumed by it (saved in COMPLETE)."""
        cfg = self.cfg
        return {"model": cfg.model.name, "num_classes": cfg.model.num_classes,
                "global_batch": global_batch_size(cfg, self.world_size), "batch_size": cfg.data.batch_size,
                "world_size": self.world_size, "accumulation_steps": cfg.optim.accumulation_steps,
                "train_batches_per_rank": len(self.train_loader) if self.train_loader is not None else 0,
                "zero_stage": cfg.engine.zero_stage, "epochs": cfg.optim.epochs}

    def _check_identity(self, tag: str, saved: dict | None) -> None:
        """Stops (one line) a resume that would load another model or reinterpret the saved
        position; announces the changes that are safe. Tags from before identities: unchecked."""
        if not saved:
            return
        mine, where = self.identity(), os.path.join(checkpointing.checkpoint_root(self.run_dir), tag)
        saved = {**mine, **saved}  # keys a newer dwnet adds are unchecked on older tags
        for key, field_name in (("model", "model.name"), ("num_classes", "model.num_classes")):
            if saved[key] != mine[key]:
                raise ResumeMismatchError(
                    f"{where} holds {field_name}={saved[key]}, this run has {field_name}={mine[key]}; set "
                    f"{field_name}={saved[key]} to resume it, or use a new checkpoint.dir for the new model")
        if saved["global_batch"] != mine["global_batch"]:
            raise ResumeMismatchError(
                f"{where} was saved with global batch {saved['global_batch']} (data.batch_size={saved['batch_size']} x "
                f"{saved['world_size']} ranks x optim.accumulation_steps={saved['accumulation_steps']}), this run has "
                f"{mine['global_batch']}: the saved position and schedule would be reinterpreted; restore the batch "
                f"settings to resume, or use a new checkpoint.dir")
        if saved["zero_stage"] != mine["zero_stage"]:
            raise ResumeMismatchError(
                f"{where} was saved with engine.zero_stage={saved['zero_stage']}, this run has "
                f"engine.zero_stage={mine['zero_stage']}: resuming across ZeRO stages is not supported; "
                f"set engine.zero_stage={saved['zero_stage']} to resume")
        if saved["train_batches_per_rank"] != mine["train_batches_per_rank"]:
            self.log.warning("resuming %s with %d train batches per rank per epoch (saved with %d): the training "
                             "data changed", tag, mine["train_batches_per_rank"], saved["train_batches_per_rank"])
        if mine["epochs"] > saved["epochs"]:
            self.log.info("optim.epochs raised from %d to %d: the LR schedule continues on the longer cosine",
                          saved["epochs"], mine["epochs"])

    def _resume_precision(self, tag: str, saved: str) -> str:
        """Switching to fp32 is always allowed; away from fp32 (which may be a non-finite
        fallback's decision) only with switch_precision. Announced in one line either way."""
        wanted = self.cfg.engine.precision
        if wanted == saved:
            return saved
        if wanted == "fp32" or self.switch_precision:
            self.log.info("resuming %s (saved in %s) in %s as engine.precision asks; optimizer moments restart",
                          tag, saved, wanted)
            return wanted
        self.log.info("resuming %s in %s as saved (engine.precision=%s is not applied: pass --switch-precision "
                      "to continue in %s)", tag, saved, wanted, wanted)
        return saved

    @property
    def finished(self) -> bool:
        return self.progress.epoch >= self.cfg.optim.epochs

    def finished_message(self) -> str:
        return (f"run already finished (epoch {self.progress.epoch} of {self.cfg.optim.epochs}); "
                "raise optim.epochs to continue")

    def _resume(self) -> None:
        """After the engine holds the resumed tag: carries on the guard's window and says where."""
        tag = self.resume_tag
        # A crash does not close a non-finite episode: tags saved after the resume stay marked.
        self.guard.skipped_steps.extend(self.progress.recent_skips)
        self.log.info("resumed from %s: epoch %d, batch %d, step %d, precision %s", tag,
                      self.progress.epoch, self.progress.batch_in_epoch, self.progress.step, self.progress.precision)

    def _restore(self, tag: str) -> None:
        """Engine, optimizer, RNG, progress, EMA and LR schedule as saved in `tag`."""
        client = checkpointing.load(self.engine, self.run_dir, tag)
        self.progress = Progress(**client["progress"])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.module.load_state_dict(client["ema"])
        self.scheduler.step_update(self.progress.step)

    def _restore_in_precision(self, tag: str, precision: str) -> None:
        """`tag` into a fresh engine of another precision: the fp32 master weights seed it, the
        optimizer moments restart (DeepSpeed cannot load them across precisions)."""
        root = checkpointing.checkpoint_root(self.run_dir)
        saved = read_client_state(root, tag)
        self._build_engine(precision, state_dict=consolidated_state_dict(root, tag))
        self.progress = Progress(**saved["progress"])
        self.progress.precision = precision
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.module.load_state_dict(saved["ema"])
        checkpointing.load_rng_state(root, tag)
        self.scheduler.step_update(self.progress.step)

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
        cfg, p = self.cfg, self.progress
        accum = cfg.optim.accumulation_steps
        usable_batches = self.steps_per_epoch * accum
        start = p.batch_in_epoch
        self.engine.train()
        bar = tqdm(total=usable_batches, initial=start, desc=f"epoch {p.epoch}", disable=self.rank != 0 or not cfg.log.progress,
                   dynamic_ncols=True, leave=False)
        # Device-side sums: reading a loss back every step would stall the GPU's queue of work.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_count = torch.zeros((), dtype=torch.float64, device=self.device)
        batches_seen = 0
        t_epoch = t_log = time.perf_counter()
        data_time = 0.0
        images_since_log = 0
        t_data = time.perf_counter()
        for batch_idx, (images, targets) in enumerate(self.train_loader.epoch(p.epoch, start), start=start):
            if batch_idx >= usable_batches:
                break
            data_time += time.perf_counter() - t_data
            # Epochs and resumes start on a step boundary, so batch_idx % accum is the micro-batch.
            loss = self.micro_step(images, targets, micro_batch=batch_idx % accum)
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss.double(), 0.0)
            loss_count += finite
            batches_seen += 1
            images_since_log += images.shape[0]
            bar.update(1)
            if (batch_idx + 1) % accum:
                t_data = time.perf_counter()
                continue
            # ---- optimizer-step boundary ----
            p.batch_in_epoch = batch_idx + 1
            outcome = self.finish_step()
            verdict = self.guard.record(p.step, applied=not outcome.skipped)
            if outcome.skipped:
                self.log.warning("step %d skipped: %s; parameters, optimizer state, BatchNorm statistics and EMA "
                                 "are unchanged (%d skipped in the last %d steps)", p.step, outcome.reason(),
                                 self.guard.skips_in_window(p.step), cfg.engine.nonfinite_window)
            if verdict is Verdict.ROLLBACK:
                bar.close()
                self._roll_back(f"{self.guard.skips_in_window(p.step)} non-finite steps within "
                                f"{cfg.engine.nonfinite_window} steps at step {p.step}")
                return None
            if p.step % cfg.log.every_steps == 0:
                elapsed = time.perf_counter() - t_log
                ips = images_since_log * self.world_size / max(elapsed, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                grad_norm = self.engine.get_global_grad_norm()
                self.log.scalars(p.step, {
                    "Train/loss": loss.item(), "Train/lr": lr, "Train/skipped_steps": self.guard.total_skipped,
                    "Train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "Train/images_per_s": ips, "Train/data_time_fraction": data_time / max(elapsed, 1e-9),
                    **self._memory_scalars()})
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
                t_log, data_time, images_since_log = time.perf_counter(), 0.0, 0
            if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0 \
                    and p.batch_in_epoch < usable_batches and self.save() is None:
                bar.close()
                self._roll_back(f"the model was not finite at step {p.step} (checkpoint not written)")
                return None
            t_data = time.perf_counter()
        bar.close()
        if batches_seen == 0 and start < usable_batches:
            raise RuntimeError(f"epoch {p.epoch}: the train loader yielded no batches")
        if dist.is_initialized():
            packed = torch.stack([loss_sum, loss_count])
            dist.all_reduce(packed)
            loss_sum, loss_count = packed[0], packed[1]
        seconds = time.perf_counter() - t_epoch
        return {"train_loss": loss_sum.item() / max(loss_count.item(), 1), "epoch_seconds": seconds,
                "images_per_s": (usable_batches - start) * cfg.data.batch_size * self.world_size / max(seconds, 1e-9)}

    def micro_step(self, images: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> torch.Tensor:
        """Forward and backward of micro-batch `micro_batch` (0-based) of the current optimizer step;
        DeepSpeed applies the update after the last one. Returns the detached loss."""
        if micro_batch == 0:
            self.step_guard.begin(self.engine.module)  # the buffers as they were before this step
        loss = self.loss_fn(self.engine(images.to(self.dtype)), targets)
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
        outcome = self.step_guard.end(self.engine.was_step_applied(), p.step)
        self.scheduler.step_update(p.step)
        if not outcome.skipped and self.ema is not None:
            self.ema.update(self.engine.module, step=p.step)
        return outcome

    def _memory_scalars(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"Memory/allocated_gb": torch.cuda.memory_allocated() / 2**30,
                    "Memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
        return {}

    def _end_of_epoch(self, stats: dict) -> dict | None:
        """Evaluates, records and saves the finished epoch; None if it rolled back instead."""
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
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
                   skipped_steps=self.guard.total_skipped, note=note, **stats, **results)
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

    # ---- checkpoints and recovery ---------------------------------------------------------
    def _model_not_finite(self) -> bool:
        """Collective: does any rank hold a NaN/Inf parameter or buffer, in the model or the EMA?
        Each rank with one logs which."""
        modules = [("", self.engine.module)] + ([("ema.", self.ema.module)] if self.ema is not None else [])
        bad, names = nonfinite_on_any_rank(modules)
        if names:
            self.log.warning("step %d: %s not finite on this rank", self.progress.step, preview(names), all_ranks=True)
        return bad

    def save(self, is_best: bool = False, suffix: str = "") -> str | None:
        """Collective. Writes a checkpoint and returns its tag, or writes nothing and returns None
        when the model or EMA is not finite on some rank (the caller rolls back)."""
        if self._model_not_finite():
            return None
        self.sync_batchnorm_statistics()
        p = self.progress
        meta = {"step": p.step, "epoch": p.epoch, "precision": p.precision,
                checkpointing.IDENTITY: self.identity()}
        p.recent_skips = [] if not self.guard.skips_in_window(p.step) else list(self.guard.skipped_steps)
        if p.recent_skips:
            meta[checkpointing.EPISODE] = p.recent_skips[0]
        client_state = {"progress": p.__dict__.copy(),
                        "ema": self.ema.module.state_dict() if self.ema is not None else None}
        tag = checkpointing.save(self.engine, self.run_dir, p.step, client_state, self.cfg.checkpoint.keep_last,
                                 is_best=is_best, suffix=suffix, meta=meta)
        episode = meta.get(checkpointing.EPISODE)
        self.log.info("saved checkpoint %s%s", tag, "" if episode is None else
                      f" (non-finite episode open since step {episode}: not a rollback target)")
        return tag

    def _roll_back(self, why: str) -> None:
        """Collective. Reloads the newest checkpoint saved before the current non-finite episode
        (bf16 continues in fp32), or stops the run with TrainingDiverged when that was tried already
        or there is none. Tags newer than the target are removed: they hold abandoned steps."""
        p = self.progress
        root = checkpointing.checkpoint_root(self.run_dir)
        first_skip = self.guard.first_skip()
        since = f"the first skipped step {first_skip}" if first_skip is not None else f"step {p.step}"
        if dist.is_initialized():
            dist.barrier()  # every rank has read the tags' metadata before any is removed
        target = checkpointing.rollback_target(root)
        removed = checkpointing.discard_after(root, target) if target is not None else []
        if p.fallbacks >= 1 or target is None:
            message = (why + (" again after the fallback" if p.fallbacks else "; no clean checkpoint to roll back to")
                       + f"; lower optim.base_lr or raise optim.warmup_epochs, then resume from {root}"
                       + (f" (it restarts from {target}, the newest checkpoint before {since})" if target else ""))
            self.log.to_file("stopping: %s", message)
            raise TrainingDiverged(message)
        old_precision = p.precision
        new_precision = "fp32" if old_precision == "bf16" else old_precision
        self.log.warning("rolling back to %s, the newest checkpoint saved before %s: %s; continuing in %s%s",
                         target, since, why, new_precision,
                         f"; removed the newer {', '.join(removed)}" if removed else "")
        if new_precision != old_precision:
            self._restore_in_precision(target, new_precision)
        else:
            self._restore(target)
        self.guard.reset()
        self.progress.fallbacks += 1
        self.progress.history.append({"step": self.progress.step, "from": old_precision, "to": new_precision})
        self.scheduler.step_update(self.progress.step)
        # Record the switch (under a new tag: the good checkpoint is never overwritten) so that a
        # crash from here on resumes in the new precision.
        if self.save(suffix=f"fallback{self.progress.fallbacks}") is None:
            message = f"{target} is not finite after reloading it; resume from an earlier tag of {root}"
            self.log.to_file("stopping: %s", message)
            raise TrainingDiverged(message)
