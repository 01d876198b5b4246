"""Training recipe: config -> data -> tokenizer -> datasets -> model -> AdamW + linear schedule -> loop.

`train(cfg, tracker, on_validate)` is a plain function: entry points only parse arguments, build the
tracker and call it. Validation on the split's fixed protocol (`promptehr.validation`) every
`validate_every_n_epochs`; `best_model` is the epoch with the lowest held-out next-visit NLL; checkpoints
`best_model`, `last` and `epoch_N` folders; `training.resume_from` (a folder, or auto) continues in the
same MLflow run, mid-epoch too. `on_validate(epoch, metrics)` lets tuning report and prune; raising
`TrainingPruned` there ends the run KILLED. How a run ends: `promptehr.run_status`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections import Counter
import logging
import math
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from promptehr.checkpoint import (git_commit, load_checkpoint, load_training_state, mark_run_state, newest_complete,
                                  package_versions, position, read_metadata, rng_state, save_checkpoint, set_rng_state)
from promptehr.collator import EHRDataCollator, EHRPatientDataset, LengthBucketSampler, RowBucketSampler
from promptehr.config import Config, ConfigError, check_config, flatten, to_yaml
from promptehr.data import held_out_subject_ids, load_patients, split_for_training
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.report import run_quality_report
from promptehr.report.privacy import patient_signature
from promptehr.resume import RunLock, config_differences, resume_checkpoint
from promptehr.run_status import (RunInterrupted, StopSignals, TrainingDiverged, TrainingPruned, end_run,
                                  ignore_stop_signals, outcome_of)
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker
from promptehr.validation import ValidationProtocol, copy_warning

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainingPruned", "RunInterrupted", "TrainingDiverged"]


# ------------------------------------------------------------------ setup steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device={name} but CUDA is not available")
    return device


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"training.precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext


def split_fingerprint(train_patients, val_patients, held_out_ids=()) -> str:
    """Hash of the split (for checks on resume), with the subjects kept for a final test when there are
    such (MEDS held_out); reveals nothing about the patients."""
    h = hashlib.sha256()
    for group in (train_patients, val_patients):
        for p in group:
            h.update(p.subject_id.encode())
        h.update(b"|")
    if held_out_ids:  # only then, so a random split keeps the fingerprint its checkpoints hold
        h.update(b"held_out|" + "|".join(held_out_ids).encode())
    return h.hexdigest()[:16]


class ResumableBatches(Sampler):
    """The training sampler's batches of an epoch, from batch `start` on: a mid-epoch resume skips the
    batches already trained without collating them (the epoch's plan is seeded by (seed, epoch))."""

    def __init__(self, sampler):
        self.sampler, self.start = sampler, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


@contextlib.contextmanager
def epoch_batches(loader):
    """The loader's iterator for one epoch, its worker processes shut down when the block is left, by
    an exception too: they ignore stop signals (`ignore_stop_signals`), so the SIGTERM with which
    multiprocessing would end them at exit could not, and an interrupted run would hang there."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # only a multi-process iterator has workers
        if shutdown is not None:
            shutdown()


def build_loader(cfg: Config, tokenizer, train_patients):
    """The training DataLoader, its sampler (`ResumableBatches`) and collator (both told the epoch), and
    the dataset's counts of unknown codes and truncations."""
    tcfg = cfg.training
    train_ds = EHRPatientDataset(train_patients, tokenizer, cfg.collator.max_length)
    train_collator = EHRDataCollator.from_config(tokenizer, cfg.collator, seed=tcfg.seed)
    if tcfg.bucket_by_length:  # rows (not patients) of similar length batched together
        train_sampler = RowBucketSampler(train_ds, train_collator, tcfg.batch_size, seed=tcfg.seed)
    else:  # patients in random batches
        train_sampler = LengthBucketSampler(train_ds.lengths, tcfg.batch_size, seed=tcfg.seed, window=1)
    train_sampler = ResumableBatches(train_sampler)
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, collate_fn=train_collator, num_workers=tcfg.num_workers,
                              persistent_workers=False, pin_memory=torch.cuda.is_available(),
                              worker_init_fn=ignore_stop_signals if tcfg.num_workers else None)
    return train_loader, train_sampler, train_collator, train_ds.report


def build_optimizer(model, tcfg, device):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "layernorm" in name.lower() or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CUDA and CPU) instead of a loop over them
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, fused=device.type in ("cuda", "cpu"))


def compiled_step_model(model, tcfg):
    """The module the training step calls: `model` itself, or with `training.compile` its
    `torch.compile` wrapper (sharing its parameters). dynamic=True: every length-bucketed batch has a
    shape of its own, so the static graph a first compile would build is thrown away at the second
    batch; one dynamic compile instead of two (the training forward is one graph, no breaks: tested)."""
    return torch.compile(model, dynamic=True) if tcfg.compile else model


LOSS_PARTS = ("loss", "lm_loss", "age_loss", "sex_loss")


def training_step(model, step_model, batch, optimizer, scheduler, max_grad_norm, autocast, device) -> torch.Tensor:
    """One optimizer step on `batch`; returns the detached (loss, lm_loss, age_loss, sex_loss). A
    non-finite loss or gradient norm raises `TrainingDiverged` before the optimizer applies it (one
    host sync per step: the price of never holding non-finite weights)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast():
        out = step_model(**batch)
    out["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    losses = torch.stack([out[k].detach() for k in LOSS_PARTS]).float()
    if not bool(torch.isfinite(torch.cat([losses, grad_norm.reshape(1).float()])).all()):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(dict(zip(LOSS_PARTS, losses.tolist())), float(grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


@dataclass
class LogWindow:
    """Loss sums of the steps since the last logged one; a mid-epoch checkpoint keeps them, so a resumed
    run logs the same means as an uninterrupted one (the throughput clock starts anew)."""

    sums: torch.Tensor
    steps: int = 0
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device, state: dict | None = None) -> "LogWindow":
        if state is None:
            return cls(torch.zeros(len(LOSS_PARTS), device=device))
        return cls(state["sums"].to(device), int(state["steps"]), int(state["rows"]))

    def add(self, losses: torch.Tensor, rows: int) -> None:
        self.sums += losses
        self.steps += 1
        self.rows += rows

    def state(self) -> dict:
        return {"sums": self.sums.detach().cpu().clone(), "steps": self.steps, "rows": self.rows}

    def log(self, tracker, lr: float, step: int) -> dict:
        """Log the window's means at `step` and start a new window; returns what was logged."""
        means = dict(zip(LOSS_PARTS, (self.sums / self.steps).tolist()))
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        tracker.log_metrics({**{f"train/{k}": v for k, v in means.items()}, "train/learning_rate": lr,
                             "train/rows_per_second": rate}, step=step)
        self.sums.zero_()
        self.steps, self.rows, self.started = 0, 0, time.perf_counter()
        return means


# ------------------------------------------------------------------ validation


def log_validation(epoch: int, metrics: dict, selection: str) -> None:
    get = lambda key: metrics.get(key, float("nan"))  # noqa: E731
    logger.info("validation epoch %d: next-visit NLL %.3f nats/visit (frequency %.3f, repeat %.3f), TPL %.2f "
                "(frequency %.2f, repeat %.2f), perplexity of unseen codes %.2f (reconstruction rows %.2f), "
                "loss %.4f, jaccard %.3f ranked (baseline %.3f); selecting by %s", epoch + 1, get("next_visit_nll"),
                get("next_visit_nll_frequency"), get("next_visit_nll_repeat"), get("tpl"), get("tpl_frequency_baseline"),
                get("tpl_repeat_baseline"), get("perplexity"), get("perplexity_reconstruction"), get("loss"),
                get("reconstruction_jaccard_ranked"), get("reconstruction_jaccard_baseline"), selection)


def checkpoint_scorer(protocol: ValidationProtocol, device, selection: str):
    """score(checkpoint folder) -> the checkpoint's `selection` metric on `protocol`: how the champion
    gate re-scores a registered model measured on another protocol (or before protocols existed)."""
    def score(folder) -> float:
        model = load_checkpoint(folder, device)[0]
        return protocol.evaluate(model, device, jaccard=False)[selection]

    return score


def sample_patients(model, tokenizer, demographics, n, seed, train_patients, max_draws: int = 10) -> tuple[list[dict], int]:
    """A few synthetic patients, demographics drawn from the training (sex, age bin) histogram. A patient
    whose visit code sets equal a training patient's never leaves the machine: it is dropped and more
    are drawn (up to `max_draws` rounds). Returns (patients, number dropped)."""
    if n <= 0:
        return [], 0
    training = {patient_signature(p) for p in train_patients}
    kept, dropped = [], 0
    for draw in range(max_draws):
        ages, sexes = sample_demographics(demographics, n, seed + 7919 * draw)
        for p in generate_patients(model, tokenizer, ages, sexes, SamplingConfig(max_visits=8), seed=seed + 7919 * draw):
            if patient_signature(p) in training:
                dropped += 1
            elif len(kept) < n:
                kept.append({"age": p.age, "sex": p.sex, "visits": p.visits})
        if len(kept) == n:
            break
    if dropped:
        logger.info("samples: %d generated patients equal to a training patient were dropped", dropped)
    if len(kept) < n:
        logger.warning("samples: only %d of %d after %d draws (the rest copied training patients)", len(kept), n, max_draws)
    return kept, dropped


# ------------------------------------------------------------------ resuming and ending


def untracked_run_name() -> str:
    """A checkpoint folder of its own for a run without a tracking run id (`--no-tracking`)."""
    return time.strftime("untracked-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_resume(resume: dict, path: Path, cfg: Config, fingerprint: str) -> None:
    if resume.get("split_fingerprint") != fingerprint:
        raise ConfigError(f"training.resume_from={path}: the data split differs from the checkpoint's "
                          "(data config or files changed)")
    for key in config_differences(cfg, path):
        logger.warning("resume: %s differs from the checkpoint's config (%s)", key, path)


def interrupted(exc: KeyboardInterrupt, ckpt_dir: Path) -> RunInterrupted:
    """`exc` as a RunInterrupted that names the checkpoint to resume from (the newest complete one)."""
    if not isinstance(exc, RunInterrupted):
        exc = RunInterrupted("SIGINT", "(KeyboardInterrupt)")
    if exc.checkpoint is None and ckpt_dir.is_dir():
        newest = newest_complete(ckpt_dir)
        exc.checkpoint = str(newest) if newest else None
    return exc


def record_outcome(ckpt_dir: Path, outcome) -> None:
    """Write how the run ended into its newest checkpoint (what `resume_from=auto` reads)."""
    newest = newest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
    if newest is not None:
        mark_run_state(newest, outcome.kind, **({"failure_reason": outcome.reason} if outcome.status == "FAILED" else {}))


# ------------------------------------------------------------------ the recipe


def train(cfg: Config, tracker: Tracker | None = None, on_validate=None) -> dict:
    """Train `cfg`; returns the final and best validation metrics, checkpoint paths and run id.

    The settings are checked before any work (ConfigError). While it runs, SIGTERM, SIGINT and SIGUSR1
    stop it at a safe point: after the current optimizer step (`last` then holds the place inside the
    epoch), or after the epoch's validation and checkpoints when one arrives during them; during the
    end-of-run quality report it stops at once (a resume redoes the report); model registration is
    finished first. It then raises `RunInterrupted` (the run ends KILLED, tagged resumable).
    `TrainingPruned`, `RunInterrupted` and `TrainingDiverged` leave the run's result in `.result`."""
    check_config(cfg)
    with StopSignals() as stop:
        return _train(cfg, tracker or Tracker(), on_validate, stop)


def _train(cfg: Config, tracker: Tracker, on_validate, stop: StopSignals) -> dict:
    tcfg = cfg.training
    seed_everything(tcfg.seed)
    device = resolve_device(tcfg.device)
    autocast = autocast_context(device, tcfg.precision)
    torch.set_float32_matmul_precision("high")

    patients, _, report = load_patients(cfg.data)
    train_patients, val_patients = split_for_training(patients, cfg.data, report)
    fingerprint = split_fingerprint(train_patients, val_patients, held_out_subject_ids(cfg.data))
    resume_from = resume_checkpoint(cfg, fingerprint, tracker.run_status)
    resume = read_metadata(resume_from) if resume_from else None
    if resume:
        check_resume(resume, resume_from, cfg, fingerprint)
        tokenizer = DiagnosisCodeTokenizer.load(resume_from / "vocab.json")
    else:
        tokenizer = DiagnosisCodeTokenizer.from_patients(train_patients)
    report.log()
    logger.info("split: %d train / %d validation patients, %d codes", len(train_patients), len(val_patients), tokenizer.n_codes)

    train_loader, train_sampler, train_collator, ds_report = build_loader(cfg, tokenizer, train_patients)
    protocol = ValidationProtocol(cfg, tokenizer, train_patients, val_patients)
    selection = protocol.selection_metric
    logger.info("validation protocol %s: %d held-out rows, %d next visits scored (%d left out: unknown codes)",
                protocol.id, len(protocol.rows), protocol.pairs.n_events, protocol.n_excluded)
    model = PromptBartWithDemographicPrediction(tokenizer, cfg).to(device)
    if not resume:
        counts = Counter(c for p in train_patients for v in p.visits for c in v)
        model.init_output_bias([counts[c] for c in tokenizer.codes])
    optimizer = build_optimizer(model, tcfg, device)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * tcfg.num_epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(tcfg.warmup_steps, total_steps), max(total_steps, 1))

    start_epoch, start_batch, global_step, best_score, run_id, window_state, resume_rng = 0, 0, 0, math.inf, None, None, None
    last_metrics: dict = {}
    if resume:
        from safetensors.torch import load_model

        load_model(model, str(resume_from / "model.safetensors"), device=str(device))
        loop_state = load_training_state(resume_from, optimizer, scheduler) or {}
        window_state, resume_rng = loop_state.get("window"), rng_state()
        (start_epoch, start_batch), global_step = position(resume), resume["global_step"]
        run_id, last_metrics = resume.get("run_id"), resume.get("metrics", {})
        if resume.get("protocol_id") == protocol.id and resume.get("selection_metric") == selection:
            best_score = resume.get("best_score", math.inf)
        else:  # a checkpoint of an earlier version: its best was chosen on another exam
            logger.warning("resume: the checkpoint's best model was selected on another validation protocol; "
                           "the next validation sets a new best")
        logger.info("resuming from %s at epoch %d, batch %d (step %d)", resume_from, start_epoch + 1, start_batch,
                    global_step)
    step_model = compiled_step_model(model, tcfg)

    lock = RunLock(resume_from.parent).acquire() if resume else None  # before its MLflow run is touched
    try:
        run_id = tracker.start(run_id)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    ckpt_dir = resume_from.parent if resume else Path(tcfg.checkpoint_dir) / (run_id or untracked_run_name())
    best_dir = ckpt_dir / "best_model"
    best_metrics: dict = resume.get("best_metrics", {}) if resume else {}
    result_quality: dict = {}
    model_info = None
    error: BaseException | None = None
    data_fingerprint = hashlib.sha256(f"{cfg.data.source}|{cfg.data.path}|{fingerprint}".encode()).hexdigest()[:16]
    try:
        lock = lock or RunLock(ckpt_dir).acquire()
        n_params = sum(p.numel() for p in model.parameters())
        if not resume:
            tracker.log_params(flatten(cfg))
            tracker.set_tags({
                "data.source": cfg.data.source, "data_fingerprint": data_fingerprint, "split_fingerprint": fingerprint,
                "protocol_id": protocol.id, "selection_metric": selection,
                **({"data.generator": cfg.data.synthetic.generator} if cfg.data.source == "synthetic" else {}),
                "n_parameters": n_params, "device": str(device), "vocab_size": len(tokenizer),
                **{f"data.{k}": v for k, v in report.counts.items()},
                **{f"dataset.{k}": v for k, v in ds_report.items()},
                **{f"version.{k}": v for k, v in package_versions().items()},
                "git_commit": git_commit() or "unknown", "promptehr.outcome": "running",
            })
            tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
            tracker.log_dict({"codes": tokenizer.codes}, "config/vocab.json")
            tracker.log_dataset(cfg.data, train_patients, val_patients, fingerprint)
        else:
            tracker.set_tags({"promptehr.outcome": "running", "promptehr.interrupted": "resumed",
                              "promptehr.resumed_from": str(resume_from)})
        logger.info("model: %.2fM parameters on %s; %d steps/epoch; checkpoints in %s", n_params / 1e6, device,
                    steps_per_epoch, ckpt_dir)
        demographics = demographics_histogram(train_patients)

        def checkpoint(folder, epoch, metrics, batches_done=None, window=None):
            """Save a checkpoint at the end of `epoch`, or inside it after `batches_done` batches."""
            tracker.flush()
            save_checkpoint(folder, model, optimizer, scheduler, cfg, tokenizer, {
                "epoch": epoch, "epoch_complete": batches_done is None, "batches_done": batches_done or steps_per_epoch,
                "global_step": global_step, "run_state": "running", "metrics": metrics, "selection_metric": selection,
                "best_score": best_score, "protocol_id": protocol.id, "best_metrics": best_metrics, "seed": tcfg.seed,
                "run_id": run_id, "split_fingerprint": fingerprint, "data_fingerprint": data_fingerprint,
                "data_source": cfg.data.source, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "demographics": demographics,  # (sex, age bin) counts: what unconditional generation samples from
            }, loop_state=None if window is None else {"window": window.state()})

        for epoch in range(start_epoch, tcfg.num_epochs):
            if tcfg.max_steps is not None and global_step >= tcfg.max_steps:
                break
            skip = start_batch if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, skip)
            train_collator.set_epoch(epoch)
            model.train()
            window = LogWindow.start(device, window_state if skip else None)
            with epoch_batches(train_loader) as batches:  # draws the loader's seed from the global RNG, as every epoch does
                if skip:  # mid-epoch resume: from here on the RNG must run as it did after the checkpoint's step
                    set_rng_state(resume_rng)
                bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}", unit="batch", leave=False,
                           dynamic_ncols=True, initial=skip, total=steps_per_epoch)
                for batch_number, batch in enumerate(bar, start=skip + 1):
                    lr = scheduler.get_last_lr()[0]
                    try:
                        losses = training_step(model, step_model, batch, optimizer, scheduler, tcfg.max_grad_norm,
                                               autocast, device)
                    except TrainingDiverged as exc:
                        exc.where = (f"step {global_step + 1} (epoch {epoch + 1}, batch {batch_number} of {steps_per_epoch}), "
                                     f"learning rate {lr:.3g}")
                        raise
                    global_step += 1
                    window.add(losses, batch["labels"].shape[0])
                    if global_step % tcfg.log_every_n_steps == 0:
                        means = window.log(tracker, scheduler.get_last_lr()[0], global_step)
                        bar.set_postfix(loss=f"{means['loss']:.4f}")
                        logger.info("epoch %d step %d/%d (global %d) - loss %.4f, lm %.4f, lr %.2e", epoch + 1, batch_number,
                                    steps_per_epoch, global_step, means["loss"], means["lm_loss"], scheduler.get_last_lr()[0])
                    if tcfg.max_steps is not None and global_step >= tcfg.max_steps:
                        break  # (a stop request waits for the epoch's validation, as at the end of an epoch)
                    if stop.requested:  # the step is done: save where we are inside the epoch, then stop
                        checkpoint(ckpt_dir / "last", epoch, last_metrics, batches_done=batch_number, window=window)
                        raise RunInterrupted(stop.name, f"at epoch {epoch + 1}, batch {batch_number} of {steps_per_epoch} "
                                             f"(step {global_step})", str(ckpt_dir / "last"))
                bar.close()

            is_last = epoch + 1 == tcfg.num_epochs or (tcfg.max_steps is not None and global_step >= tcfg.max_steps)
            if (epoch + 1) % tcfg.validate_every_n_epochs == 0 or is_last:
                metrics = protocol.evaluate(step_model, device, autocast)
                metrics["epoch"] = epoch + 1
                last_metrics = metrics
                tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=global_step)
                log_validation(epoch, metrics, selection)
                stuck = copy_warning(metrics)
                if stuck:
                    logger.warning(stuck)
                    tracker.set_tags({"promptehr.stuck": f"epoch {epoch + 1}: {stuck}"})
                samples, dropped = sample_patients(model, tokenizer, demographics, cfg.tracking.n_sample_patients,
                                                   tcfg.seed + epoch, train_patients)
                if samples:
                    tracker.log_dict({"epoch": epoch + 1, "dropped_training_copies": dropped, "synthetic_patients": samples},
                                     f"samples/epoch_{epoch + 1:03d}.json")
                if metrics[selection] < best_score:
                    best_score, best_metrics = metrics[selection], dict(metrics)
                    checkpoint(best_dir, epoch, metrics)
                if on_validate is not None:
                    on_validate(epoch, metrics)
            if (epoch + 1) % tcfg.save_every_n_epochs == 0:
                checkpoint(ckpt_dir / f"epoch_{epoch + 1:03d}", epoch, last_metrics)
            checkpoint(ckpt_dir / "last", epoch, last_metrics)
            if stop.requested:  # it came during validation: the epoch is finished and saved
                raise RunInterrupted(stop.name, f"after epoch {epoch + 1} (step {global_step})", str(ckpt_dir / "last"))

        if tcfg.quality_report and tcfg.quality_report_patients > 0 and best_dir.exists():
            with stop.at_once():  # redone on resume: cheaper than waiting for it
                best_model = load_checkpoint(best_dir, device)[0]
                result_quality = run_quality_report(
                    best_model, tokenizer, train_patients, val_patients, tracker, step=global_step,
                    n_patients=tcfg.quality_report_patients, seed=cfg.validation.seed, prompt_prob=cfg.validation.prompt_prob,
                    max_length=cfg.collator.max_length, released_patients=tcfg.quality_report_released_patients)
        if best_dir.exists():  # a stop signal now waits: a half-registered model would be registered twice
            tracker.set_tags({f"best_{selection}": best_score, "best_epoch": best_metrics.get("epoch")})
            model_info = tracker.log_model(str(best_dir), best_score, {
                "data_source": cfg.data.source, "data_fingerprint": data_fingerprint, "run_id": run_id,
                "protocol_id": protocol.id, "selection_metric": selection, "val_loss": best_metrics.get("loss")},
                rescore=checkpoint_scorer(protocol, device, selection))
    except KeyboardInterrupt as exc:
        error = interrupted(exc, ckpt_dir)
        if error is exc:
            raise
        raise error from None
    except BaseException as exc:
        error = exc
        raise
    finally:
        result = {"run_id": run_id, "global_step": global_step, "selection_metric": selection, "best_score": best_score,
                  "protocol_id": protocol.id, "best_metrics": best_metrics, "final_metrics": last_metrics,
                  "checkpoint_dir": str(ckpt_dir), "best_checkpoint": str(best_dir) if best_dir.exists() else None,
                  "quality": result_quality, **({"model": model_info} if model_info is not None else {})}
        if isinstance(error, (TrainingPruned, RunInterrupted, TrainingDiverged)):
            error.result = result
        outcome = outcome_of(error)
        try:
            record_outcome(ckpt_dir, outcome)
        finally:
            end_run(tracker, outcome)
            if lock is not None:
                lock.release()
    return result
