"""The training recipe: setup, the epoch loop, finish.

`train(cfg, tracker, on_validate)` checks the settings, builds the run (`setup`: data split, vocabulary,
validation protocol, model, optimizer, the MLflow run and checkpoint folder, or all of that from the
checkpoint it resumes), trains epoch by epoch (`train_epoch`, then `end_epoch`: validation on the split's
fixed protocol, samples, checkpoints), then `finish`es (quality report, model registration). What changes
as it trains is a `RunState`; how the run ends (FINISHED, KILLED and resumable, FAILED) is decided by
`promptehr.run_status`. `on_validate(epoch, metrics)` lets tuning report and prune (`TrainingPruned`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from promptehr.checkpoint import (
    git_commit,
    load_checkpoint,
    load_training_state,
    mark_run_state,
    newest_complete,
    package_versions,
    position,
    read_metadata,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from promptehr.config import Config, ConfigError, check_config, flatten, to_yaml
from promptehr.data import held_out_subject_ids, load_patients, split_fingerprint, split_for_training
from promptehr.engine import (
    LogWindow,
    WeightAverage,
    autocast_context,
    build_loader,
    build_optimizer,
    compiled_step_model,
    epoch_batches,
    resolve_device,
    seed_everything,
    training_step,
)
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.report import run_quality_report
from promptehr.report.privacy import patient_signature
from promptehr.resume import RunLock, config_differences, resume_checkpoint
from promptehr.run_status import RunInterrupted, StopSignals, TrainingDiverged, TrainingPruned, end_run, outcome_of
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker
from promptehr.validation import ValidationProtocol, copy_warning, repeat_warning

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainingPruned", "RunInterrupted", "TrainingDiverged"]


# ------------------------------------------------------------------ validation


def log_validation(epoch: int, metrics: dict, selection: str) -> None:
    get = lambda key: metrics.get(key, float("nan"))  # noqa: E731
    logger.info(
        "validation epoch %d: next-visit NLL %.3f nats/visit (frequency %.3f, repeat %.3f), TPL %.2f "
        "(frequency %.2f, repeat %.2f), perplexity of unseen codes %.2f (reconstruction rows %.2f), "
        "loss %.4f, jaccard %.3f ranked (baseline %.3f); selecting by %s",
        epoch + 1,
        get("next_visit_nll"),
        get("next_visit_nll_frequency"),
        get("next_visit_nll_repeat"),
        get("tpl"),
        get("tpl_frequency_baseline"),
        get("tpl_repeat_baseline"),
        get("perplexity"),
        get("perplexity_reconstruction"),
        get("loss"),
        get("reconstruction_jaccard_ranked"),
        get("reconstruction_jaccard_baseline"),
        selection,
    )


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
        raise ConfigError(
            f"training.resume_from={path}: the data split differs from the checkpoint's (data config or files changed)"
        )
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


# ------------------------------------------------------------------ the run


@dataclass
class Split:
    """The training and held-out patients, and what identifies them."""

    train: list
    val: list
    report: object  # the loader's DataReport (counts of what was kept and dropped)
    fingerprint: str  # the split (checked on resume)
    data_fingerprint: str  # the split and where it came from (the champion gate compares it)
    demographics: dict  # (sex, age bin) counts of training patients: what generation samples from
    dataset_counts: dict = field(default_factory=dict)  # the training dataset's unknown codes and truncations


@dataclass
class RunState:
    """What changes as a run trains: every checkpoint records it, a resume starts from it."""

    start_epoch: int = 0  # where training starts: 0, or the resumed checkpoint's place,
    start_batch: int = 0  # batches of start_epoch already trained
    global_step: int = 0
    best_score: float = math.inf
    best_metrics: dict = field(default_factory=dict)
    stale_validations: int = 0  # validations in a row without an improvement (training.early_stopping_*)
    stopped_early: str | None = None  # why the run stopped before num_epochs, when it did
    last_metrics: dict = field(default_factory=dict)
    window: dict | None = None  # a mid-epoch resume: the partial logging window ...
    rng: dict | None = None  # ... and the random state after the checkpoint's step
    quality: dict = field(default_factory=dict)
    model_info: object = None


@dataclass
class Run:
    """A training run's parts, built once by `setup`."""

    cfg: Config
    tracker: Tracker
    stop: StopSignals
    device: torch.device
    autocast: object
    split: Split
    tokenizer: DiagnosisCodeTokenizer
    protocol: ValidationProtocol
    model: PromptBartWithDemographicPrediction
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    sampler: object
    collator: object
    state: RunState
    resume_from: Path | None = None
    run_id: str | None = None
    ckpt_dir: Path | None = None
    lock: RunLock | None = None
    average: WeightAverage | None = None  # training.ema_decay > 0: the weights validation scores

    def averaged_weights(self):
        """Inside the block the model holds the weights validation scores and best_model keeps: the
        weight average when the run keeps one, else its own."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    @property
    def selection(self) -> str:
        return self.protocol.selection_metric

    @property
    def best_dir(self) -> Path:
        return self.ckpt_dir / "best_model"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def out_of_steps(self) -> bool:
        max_steps = self.cfg.training.max_steps
        return max_steps is not None and self.state.global_step >= max_steps

    def out_of_patience(self) -> bool:
        patience = self.cfg.training.early_stopping_patience
        return patience > 0 and self.state.stale_validations >= patience

    def checkpoint(
        self, folder: Path, epoch: int, metrics: dict, batches_done: int | None = None, window: LogWindow | None = None
    ) -> None:
        """Save a checkpoint at the end of `epoch`, or inside it after `batches_done` batches."""
        self.tracker.flush()
        s, split = self.state, self.split
        save_checkpoint(
            folder,
            self.model,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.tokenizer,
            {
                "epoch": epoch,
                "epoch_complete": batches_done is None,
                "batches_done": batches_done or self.steps_per_epoch,
                "global_step": s.global_step,
                "run_state": "running",
                "metrics": metrics,
                "selection_metric": self.selection,
                "best_score": s.best_score,
                "protocol_id": self.protocol.id,
                "best_metrics": s.best_metrics,
                "stale_validations": s.stale_validations,
                "seed": self.cfg.training.seed,
                "run_id": self.run_id,
                "split_fingerprint": split.fingerprint,
                "data_fingerprint": split.data_fingerprint,
                "data_source": self.cfg.data.source,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "demographics": split.demographics,
            },
            loop_state=None if window is None else {"window": window.state()},
            # best_model's weights ARE the average (saved inside `averaged_weights`): not a second copy
            average=None if self.average is None or folder == self.best_dir else self.average.state_dict(),
        )

    def result(self) -> dict:
        s = self.state
        return {
            "run_id": self.run_id,
            "global_step": s.global_step,
            "selection_metric": self.selection,
            "best_score": s.best_score,
            "protocol_id": self.protocol.id,
            "best_metrics": s.best_metrics,
            "final_metrics": s.last_metrics,
            "stopped_early": s.stopped_early,
            "checkpoint_dir": str(self.ckpt_dir),
            "best_checkpoint": str(self.best_dir) if self.best_dir.exists() else None,
            "quality": s.quality,
            **({"model": s.model_info} if s.model_info is not None else {}),
        }


# ------------------------------------------------------------------ the recipe


def train(cfg: Config, tracker: Tracker | None = None, on_validate=None) -> dict:
    """Train `cfg`; returns the final and best validation metrics, checkpoint paths and run id.

    The settings are checked before any work (ConfigError). While it runs, SIGTERM, SIGINT and SIGUSR1
    stop it at a safe point: after the current optimizer step (`last` then holds the place inside the
    epoch), or after the epoch's validation and checkpoints when one arrives during them; during the
    end-of-run quality report it stops at once (a resume redoes the report); model registration is
    finished first. It then raises `RunInterrupted` (the run ends KILLED, tagged resumable).
    With `training.early_stopping_patience` the run ends before `num_epochs` once that many validations in
    a row have not improved the selection metric (the log and the tag `promptehr.stopped_early` say so).
    `TrainingPruned`, `RunInterrupted` and `TrainingDiverged` leave the run's result in `.result`."""
    check_config(cfg)
    with StopSignals() as stop:
        run = setup(cfg, tracker or Tracker(), stop)
        error: BaseException | None = None
        try:
            open_run(run)
            for epoch in range(run.state.start_epoch, cfg.training.num_epochs):
                if run.out_of_steps() or run.out_of_patience():
                    break
                train_epoch(run, epoch)
                end_epoch(run, epoch, on_validate)
            if run.out_of_patience() and run.state.last_metrics.get("epoch", 0) < cfg.training.num_epochs:
                stopped_early(run)
            finish(run)
        except KeyboardInterrupt as exc:
            error = interrupted(exc, run.ckpt_dir)
            if error is exc:
                raise
            raise error from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            close_run(run, error)
        return run.result()


def setup(cfg: Config, tracker: Tracker, stop: StopSignals) -> Run:
    """Everything a run needs before its first step; from the resumed checkpoint when there is one. Ends
    with the MLflow run started (or continued) and the run's checkpoint folder chosen."""
    tcfg = cfg.training
    seed_everything(tcfg.seed)
    device = resolve_device(tcfg.device)
    torch.set_float32_matmul_precision("high")
    split = load_split(cfg)
    resume_from = resume_checkpoint(cfg, split.fingerprint, tracker.run_status)
    meta = read_metadata(resume_from) if resume_from else None
    if meta:
        check_resume(meta, resume_from, cfg, split.fingerprint)
        tokenizer = DiagnosisCodeTokenizer.load(resume_from / "vocab.json")
    else:
        tokenizer = DiagnosisCodeTokenizer.from_patients(split.train, cfg.model.visit_order)
    split.report.log()
    logger.info("split: %d train / %d validation patients, %d codes", len(split.train), len(split.val), tokenizer.n_codes)

    loader, sampler, collator, ds_report = build_loader(cfg, tokenizer, split.train)
    split.dataset_counts = ds_report
    protocol = ValidationProtocol(cfg, tokenizer, split.train, split.val)
    logger.info(
        "validation protocol %s: %d held-out rows, %d next visits scored (%d left out: unknown codes)",
        protocol.id,
        len(protocol.rows),
        protocol.pairs.n_events,
        protocol.n_excluded,
    )
    model = PromptBartWithDemographicPrediction(tokenizer, cfg).to(device)
    if not meta:
        counts = Counter(c for p in split.train for v in p.visits for c in v)
        model.init_output_bias([counts[c] for c in tokenizer.codes])
    optimizer = build_optimizer(model, tcfg, device)
    total_steps = len(loader) * tcfg.num_epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(tcfg.warmup_steps, total_steps), max(total_steps, 1))
    run = Run(
        cfg=cfg,
        tracker=tracker,
        stop=stop,
        device=device,
        autocast=autocast_context(device, tcfg.precision),
        split=split,
        tokenizer=tokenizer,
        protocol=protocol,
        model=model,
        step_model=compiled_step_model(model, tcfg),
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sampler=sampler,
        collator=collator,
        state=RunState(),
        resume_from=resume_from,
        average=WeightAverage(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None,
    )
    if meta:
        restore(run, meta)
    start_tracking(run)
    return run


def load_split(cfg: Config) -> Split:
    patients, _, report = load_patients(cfg.data)
    train_patients, val_patients = split_for_training(patients, cfg.data, report)
    fingerprint = split_fingerprint(train_patients, val_patients, held_out_subject_ids(cfg.data))
    data_fingerprint = hashlib.sha256(f"{cfg.data.source}|{cfg.data.path}|{fingerprint}".encode()).hexdigest()[:16]
    return Split(train_patients, val_patients, report, fingerprint, data_fingerprint, demographics_histogram(train_patients))


def restore(run: Run, meta: dict) -> None:
    """Weights, optimizer, schedule and `RunState` from the checkpoint the run resumes."""
    folder, s = run.resume_from, run.state
    load_model(run.model, str(folder / "model.safetensors"), device=str(run.device))
    loop_state, average = load_training_state(folder, run.optimizer, run.scheduler)
    loop_state = loop_state or {}
    if run.average is not None:
        if average is None:  # the checkpoint's run kept no average: start one from its weights
            logger.warning("resume: %s holds no weight average; training.ema_decay starts one from its weights", folder)
            run.average = WeightAverage(run.model, run.cfg.training.ema_decay)
        else:
            run.average.load_state_dict(average)
    s.window, s.rng = loop_state.get("window"), rng_state()
    (s.start_epoch, s.start_batch), s.global_step = position(meta), meta["global_step"]
    run.run_id, s.last_metrics = meta.get("run_id"), meta.get("metrics", {})
    s.best_metrics = meta.get("best_metrics", {})
    if meta.get("protocol_id") == run.protocol.id and meta.get("selection_metric") == run.selection:
        s.best_score = meta.get("best_score", math.inf)
        s.stale_validations = meta.get("stale_validations", 0)
    else:  # a checkpoint of an earlier version: its best was chosen on another exam
        logger.warning(
            "resume: the checkpoint's best model was selected on another validation protocol; "
            "the next validation sets a new best"
        )
    logger.info("resuming from %s at epoch %d, batch %d (step %d)", folder, s.start_epoch + 1, s.start_batch, s.global_step)


def start_tracking(run: Run) -> None:
    """Start the MLflow run (or continue the resumed one) and choose the checkpoint folder. A resumed
    run's folder is locked before its MLflow run is touched; a new run's folder is named after it."""
    if run.resume_from is not None:
        run.lock = RunLock(run.resume_from.parent).acquire()
    try:
        run.run_id = run.tracker.start(run.run_id)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    if run.resume_from is not None:
        run.ckpt_dir = run.resume_from.parent
    else:
        run.ckpt_dir = Path(run.cfg.training.checkpoint_dir) / (run.run_id or untracked_run_name())


def open_run(run: Run) -> None:
    """Lock a new run's folder and log what the run is: parameters, tags, config, vocabulary, dataset."""
    cfg, tracker, split = run.cfg, run.tracker, run.split
    run.lock = run.lock or RunLock(run.ckpt_dir).acquire()
    n_params = sum(p.numel() for p in run.model.parameters())
    if run.resume_from is None:
        tracker.log_params(flatten(cfg))
        tracker.set_tags(
            {
                "data.source": cfg.data.source,
                "data_fingerprint": split.data_fingerprint,
                "split_fingerprint": split.fingerprint,
                "protocol_id": run.protocol.id,
                "selection_metric": run.selection,
                **({"data.generator": cfg.data.synthetic.generator} if cfg.data.source == "synthetic" else {}),
                "n_parameters": n_params,
                "device": str(run.device),
                "vocab_size": len(run.tokenizer),
                **{f"data.{k}": v for k, v in split.report.counts.items()},
                **{f"dataset.{k}": v for k, v in split.dataset_counts.items()},
                **{f"version.{k}": v for k, v in package_versions().items()},
                "git_commit": git_commit() or "unknown",
                "promptehr.outcome": "running",
            }
        )
        tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
        tracker.log_dict({"codes": run.tokenizer.codes}, "config/vocab.json")
        tracker.log_dataset(cfg.data, split.train, split.val, split.fingerprint)
    else:
        tracker.set_tags(
            {
                "promptehr.outcome": "running",
                "promptehr.interrupted": "resumed",
                "promptehr.resumed_from": str(run.resume_from),
            }
        )
    logger.info(
        "model: %.2fM parameters on %s; %d steps/epoch; checkpoints in %s",
        n_params / 1e6,
        run.device,
        run.steps_per_epoch,
        run.ckpt_dir,
    )


def train_epoch(run: Run, epoch: int) -> None:
    """Train one epoch (the rest of it, when the run resumed inside it). A stop request is honoured after
    the step it arrives in: `last` is saved at that place and `RunInterrupted` raised."""
    tcfg, s = run.cfg.training, run.state
    skip = s.start_batch if epoch == s.start_epoch else 0
    run.sampler.set_epoch(epoch, skip)
    run.collator.set_epoch(epoch)
    run.model.train()
    window = LogWindow.start(run.device, s.window if skip else None)
    with epoch_batches(run.loader) as batches:  # draws the loader's seed from the global RNG, as every epoch does
        if skip:  # mid-epoch resume: from here on the RNG must run as it did after the checkpoint's step
            set_rng_state(s.rng)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{tcfg.num_epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            initial=skip,
            total=run.steps_per_epoch,
        )
        for batch_number, batch in enumerate(bar, start=skip + 1):
            step(run, batch, epoch, batch_number, window, bar)
            if run.out_of_steps():
                break  # (a stop request waits for the epoch's validation, as at the end of an epoch)
            if run.stop.requested:  # the step is done: save where we are inside the epoch, then stop
                run.checkpoint(run.ckpt_dir / "last", epoch, s.last_metrics, batches_done=batch_number, window=window)
                raise RunInterrupted(
                    run.stop.name,
                    f"at epoch {epoch + 1}, batch {batch_number} of {run.steps_per_epoch} (step {s.global_step})",
                    str(run.ckpt_dir / "last"),
                )
        bar.close()


def step(run: Run, batch: dict, epoch: int, batch_number: int, window: LogWindow, bar) -> None:
    """One optimizer step, and the loss window logged every `log_every_n_steps`."""
    tcfg, s = run.cfg.training, run.state
    lr = run.scheduler.get_last_lr()[0]
    try:
        losses = training_step(
            run.model, run.step_model, batch, run.optimizer, run.scheduler, tcfg.max_grad_norm, run.autocast, run.device
        )
    except TrainingDiverged as exc:
        exc.where = (
            f"step {s.global_step + 1} (epoch {epoch + 1}, batch {batch_number} of {run.steps_per_epoch}), "
            f"learning rate {lr:.3g}"
        )
        raise
    if run.average is not None:
        run.average.update()
    s.global_step += 1
    window.add(losses, batch["labels"].shape[0])
    if s.global_step % tcfg.log_every_n_steps == 0:
        lr = run.scheduler.get_last_lr()[0]
        means = window.log(run.tracker, lr, s.global_step)
        bar.set_postfix(loss=f"{means['loss']:.4f}")
        logger.info(
            "epoch %d step %d/%d (global %d) - loss %.4f, lm %.4f, lr %.2e",
            epoch + 1,
            batch_number,
            run.steps_per_epoch,
            s.global_step,
            means["loss"],
            means["lm_loss"],
            lr,
        )


def end_epoch(run: Run, epoch: int, on_validate) -> None:
    """Validate when due (or at the end), then save `epoch_NNN` when due and `last`. A stop request that
    arrived meanwhile is honoured now that the epoch is saved."""
    tcfg, s = run.cfg.training, run.state
    is_last = epoch + 1 == tcfg.num_epochs or run.out_of_steps()
    if (epoch + 1) % tcfg.validate_every_n_epochs == 0 or is_last:
        validate(run, epoch, on_validate)
    if (epoch + 1) % tcfg.save_every_n_epochs == 0:
        run.checkpoint(run.ckpt_dir / f"epoch_{epoch + 1:03d}", epoch, s.last_metrics)
    run.checkpoint(run.ckpt_dir / "last", epoch, s.last_metrics)
    if run.stop.requested:  # it came during validation: the epoch is finished and saved
        raise RunInterrupted(run.stop.name, f"after epoch {epoch + 1} (step {s.global_step})", str(run.ckpt_dir / "last"))


def validate(run: Run, epoch: int, on_validate) -> None:
    """Score the protocol, log it (with a warning when the model has not learned to copy), log a few
    synthetic patients, keep `best_model`, and let `on_validate` report or prune. With
    `training.ema_decay` all of it sees the weight average (`Run.averaged_weights`)."""
    with run.averaged_weights():
        scored(run, epoch)
    if on_validate is not None:
        on_validate(epoch, run.state.last_metrics)


def scored(run: Run, epoch: int) -> None:
    """`validate` with the weights it scores in place."""
    s, tracker = run.state, run.tracker
    metrics = run.protocol.evaluate(run.step_model, run.device, run.autocast)
    metrics["epoch"] = epoch + 1
    s.last_metrics = metrics
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=s.global_step)
    log_validation(epoch, metrics, run.selection)
    stuck = copy_warning(metrics, s.global_step)
    if stuck:
        logger.warning(stuck)
        tracker.set_tags({"promptehr.stuck": f"epoch {epoch + 1}: {stuck}"})
    samples, dropped = sample_patients(
        run.model,
        run.tokenizer,
        run.split.demographics,
        run.cfg.tracking.n_sample_patients,
        run.cfg.training.seed + epoch,
        run.split.train,
    )
    if samples:
        tracker.log_dict(
            {"epoch": epoch + 1, "dropped_training_copies": dropped, "synthetic_patients": samples},
            f"samples/epoch_{epoch + 1:03d}.json",
        )
    tcfg = run.cfg.training
    improved = metrics[run.selection] < s.best_score - tcfg.early_stopping_min_delta
    s.stale_validations = 0 if improved else s.stale_validations + 1
    if metrics[run.selection] < s.best_score:
        s.best_score, s.best_metrics = metrics[run.selection], dict(metrics)
        run.checkpoint(run.best_dir, epoch, metrics)


def stopped_early(run: Run) -> None:
    """Say that `training.early_stopping_patience` ended the run, in the log and as a run tag."""
    tcfg, s = run.cfg.training, run.state
    epoch = s.last_metrics.get("epoch")
    by = f" by more than {tcfg.early_stopping_min_delta:g}" if tcfg.early_stopping_min_delta > 0 else ""
    s.stopped_early = (
        f"after epoch {epoch} of {tcfg.num_epochs}: {run.selection} did not improve{by} in {s.stale_validations} "
        f"validations in a row (best {s.best_score:.4f} at epoch {s.best_metrics.get('epoch')})"
    )
    logger.info("early stopping %s", s.stopped_early)
    run.tracker.set_tags({"promptehr.stopped_early": s.stopped_early})


def finish(run: Run) -> None:
    """The quality report of the best model, then its registration (behind the champion gate)."""
    cfg, s, tcfg = run.cfg, run.state, run.cfg.training
    if tcfg.quality_report and tcfg.quality_report_patients > 0 and run.best_dir.exists():
        with run.stop.at_once():  # redone on resume: cheaper than waiting for it
            best_model = load_checkpoint(run.best_dir, run.device)[0]
            s.quality = run_quality_report(
                best_model,
                run.tokenizer,
                run.split.train,
                run.split.val,
                run.tracker,
                step=s.global_step,
                n_patients=tcfg.quality_report_patients,
                seed=cfg.validation.seed,
                prompt_prob=cfg.validation.prompt_prob,
                max_length=cfg.collator.max_length,
                released_patients=tcfg.quality_report_released_patients,
            )
    below_repeat = repeat_warning(s.best_metrics)
    if below_repeat:
        logger.warning(below_repeat)
        run.tracker.set_tags({"promptehr.below_repeat": below_repeat})
    if run.best_dir.exists():  # a stop signal now waits: a half-registered model would be registered twice
        run.tracker.set_tags({f"best_{run.selection}": s.best_score, "best_epoch": s.best_metrics.get("epoch")})
        s.model_info = run.tracker.log_model(
            str(run.best_dir),
            s.best_score,
            {
                "data_source": cfg.data.source,
                "data_fingerprint": run.split.data_fingerprint,
                "run_id": run.run_id,
                "protocol_id": run.protocol.id,
                "selection_metric": run.selection,
                "val_loss": s.best_metrics.get("loss"),
            },
            rescore=checkpoint_scorer(run.protocol, run.device, run.selection),
        )


def close_run(run: Run, error: BaseException | None) -> None:
    """End the run as `error` says (none: FINISHED): the outcome goes into the newest checkpoint (what
    `resume_from=auto` reads) and the MLflow run, and the folder's lock is released."""
    if isinstance(error, (TrainingPruned, RunInterrupted, TrainingDiverged)):
        error.result = run.result()
    outcome = outcome_of(error)
    try:
        record_outcome(run.ckpt_dir, outcome)
    finally:
        end_run(run.tracker, outcome)
        if run.lock is not None:
            run.lock.release()
