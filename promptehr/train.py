"""Training recipe: config -> data -> tokenizer -> datasets -> model -> AdamW + linear schedule -> loop.

`train(cfg, tracker, on_validate)` is a plain function: entry points only parse arguments, build the
tracker and call it. Validation on the split's fixed protocol (`promptehr.validation`) every
`validate_every_n_epochs`; `best_model` is the epoch with the lowest held-out next-visit NLL; checkpoints
`best_model`, `last` and `epoch_N` folders; `training.resume_from` continues in the same MLflow run.
`on_validate(epoch, metrics)` lets tuning report and prune; raising `TrainingPruned` there ends the
run with status KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from promptehr.checkpoint import (git_commit, load_checkpoint, load_config_from_checkpoint, load_training_state,
                                  package_versions, read_metadata, save_checkpoint)
from promptehr.collator import EHRDataCollator, EHRPatientDataset, LengthBucketSampler, RowBucketSampler
from promptehr.config import Config, flatten, to_yaml
from promptehr.data import held_out_subject_ids, load_patients, split_for_training
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.report import run_quality_report
from promptehr.report.privacy import patient_signature
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker
from promptehr.validation import ValidationProtocol, copy_warning

logger = logging.getLogger(__name__)


class TrainingPruned(Exception):
    """Raised by an `on_validate` callback to stop a run early (a pruned tuning trial)."""


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


def build_loader(cfg: Config, tokenizer, train_patients):
    """The training DataLoader, its sampler and collator (both told the epoch), and the dataset's
    counts of unknown codes and truncations."""
    tcfg = cfg.training
    train_ds = EHRPatientDataset(train_patients, tokenizer, cfg.collator.max_length)
    train_collator = EHRDataCollator.from_config(tokenizer, cfg.collator, seed=tcfg.seed)
    if tcfg.bucket_by_length:  # rows (not patients) of similar length batched together
        train_sampler = RowBucketSampler(train_ds, train_collator, tcfg.batch_size, seed=tcfg.seed)
    else:  # patients in random batches
        train_sampler = LengthBucketSampler(train_ds.lengths, tcfg.batch_size, seed=tcfg.seed, window=1)
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, collate_fn=train_collator, num_workers=tcfg.num_workers,
                              persistent_workers=False, pin_memory=torch.cuda.is_available())
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


def training_step(model, step_model, batch, optimizer, scheduler, max_grad_norm, autocast, device) -> torch.Tensor:
    """One optimizer step on `batch`; returns the detached (loss, lm_loss, age_loss, sex_loss) without
    a host sync, so the loop only syncs when it logs."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast():
        out = step_model(**batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([out["loss"].detach(), out["lm_loss"].detach(), out["age_loss"].detach(), out["sex_loss"].detach()]).float()


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


# ------------------------------------------------------------------ the recipe


def train(cfg: Config, tracker: Tracker | None = None, on_validate=None) -> dict:
    """Train `cfg`; returns the final and best validation metrics, checkpoint paths and run id."""
    tracker = tracker or Tracker()
    tcfg = cfg.training
    seed_everything(tcfg.seed)
    device = resolve_device(tcfg.device)
    autocast = autocast_context(device, tcfg.precision)
    torch.set_float32_matmul_precision("high")

    resume = read_metadata(tcfg.resume_from) if tcfg.resume_from else None
    patients, _, report = load_patients(cfg.data)
    train_patients, val_patients = split_for_training(patients, cfg.data, report)
    fingerprint = split_fingerprint(train_patients, val_patients, held_out_subject_ids(cfg.data))
    if resume:
        if resume.get("split_fingerprint") != fingerprint:
            raise ValueError(f"{tcfg.resume_from}: the data split differs from the checkpoint's (data config or files changed)")
        tokenizer = DiagnosisCodeTokenizer.load(Path(tcfg.resume_from) / "vocab.json")
        saved = flatten(load_config_from_checkpoint(tcfg.resume_from))
        for key, value in flatten(cfg).items():
            if key != "training.resume_from" and saved.get(key) != value:
                logger.warning("resume: %s is %r here but %r in the checkpoint", key, value, saved.get(key))
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

    start_epoch, global_step, best_score, run_id = 0, 0, math.inf, None
    if resume:
        from safetensors.torch import load_model

        load_model(model, str(Path(tcfg.resume_from) / "model.safetensors"), device=str(device))
        load_training_state(tcfg.resume_from, optimizer, scheduler)
        start_epoch, global_step = resume["epoch"] + 1, resume["global_step"]
        run_id = resume.get("run_id")
        if resume.get("protocol_id") == protocol.id and resume.get("selection_metric") == selection:
            best_score = resume.get("best_score", math.inf)
        else:  # a checkpoint of an earlier version: its best was chosen on another exam
            logger.warning("resume: the checkpoint's best model was selected on another validation protocol; "
                           "the next validation sets a new best")
        logger.info("resuming from %s at epoch %d (step %d)", tcfg.resume_from, start_epoch + 1, global_step)
    step_model = compiled_step_model(model, tcfg)

    run_id = tracker.start(run_id)
    n_params = sum(p.numel() for p in model.parameters())
    data_fingerprint = hashlib.sha256(f"{cfg.data.source}|{cfg.data.path}|{fingerprint}".encode()).hexdigest()[:16]
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
            "git_commit": git_commit() or "unknown",
        })
        tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
        tracker.log_dict({"codes": tokenizer.codes}, "config/vocab.json")
        tracker.log_dataset(cfg.data, train_patients, val_patients, fingerprint)
    logger.info("model: %.2fM parameters on %s; %d steps/epoch", n_params / 1e6, device, steps_per_epoch)

    ckpt_dir = Path(tcfg.checkpoint_dir) / (run_id or "run")
    best_dir = ckpt_dir / "best_model"
    last_metrics: dict = {}
    best_metrics: dict = resume.get("best_metrics", {}) if resume else {}
    demographics = demographics_histogram(train_patients)
    status = "FAILED"
    result_quality: dict = {}

    def checkpoint(folder, epoch, metrics):
        tracker.flush()
        save_checkpoint(folder, model, optimizer, scheduler, cfg, tokenizer, {
            "epoch": epoch, "global_step": global_step, "metrics": metrics, "selection_metric": selection,
            "best_score": best_score, "protocol_id": protocol.id, "best_metrics": best_metrics, "seed": tcfg.seed, "run_id": run_id, "split_fingerprint": fingerprint,
            "data_fingerprint": data_fingerprint, "data_source": cfg.data.source,
            "demographics": demographics,  # (sex, age bin) counts: what unconditional generation samples from
        })

    try:
        for epoch in range(start_epoch, tcfg.num_epochs):
            if tcfg.max_steps is not None and global_step >= tcfg.max_steps:
                break
            train_sampler.set_epoch(epoch)
            train_collator.set_epoch(epoch)
            model.train()
            sums = torch.zeros(4, device=device)
            n_window, t_window, rows_window = 0, time.perf_counter(), 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}", unit="batch", leave=False, dynamic_ncols=True)
            for batch in bar:
                sums += training_step(model, step_model, batch, optimizer, scheduler, tcfg.max_grad_norm, autocast, device)
                global_step += 1
                n_window += 1
                rows_window += batch["labels"].shape[0]
                if global_step % tcfg.log_every_n_steps == 0:
                    loss, lm, age, sex = (sums / n_window).tolist()
                    lr = scheduler.get_last_lr()[0]
                    elapsed = time.perf_counter() - t_window
                    tracker.log_metrics({"train/loss": loss, "train/lm_loss": lm, "train/age_loss": age,
                                         "train/sex_loss": sex, "train/learning_rate": lr,
                                         "train/rows_per_second": rows_window / max(elapsed, 1e-9)}, step=global_step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    logger.info("epoch %d step %d/%d (global %d) - loss %.4f, lm %.4f, lr %.2e", epoch + 1,
                                (global_step - 1) % steps_per_epoch + 1, steps_per_epoch, global_step, loss, lm, lr)
                    sums.zero_()
                    n_window, t_window, rows_window = 0, time.perf_counter(), 0
                if tcfg.max_steps is not None and global_step >= tcfg.max_steps:
                    break
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
        if tcfg.quality_report and tcfg.quality_report_patients > 0 and best_dir.exists():
            best_model = load_checkpoint(best_dir, device)[0]
            result_quality = run_quality_report(
                best_model, tokenizer, train_patients, val_patients, tracker, step=global_step,
                n_patients=tcfg.quality_report_patients, seed=cfg.validation.seed, prompt_prob=cfg.validation.prompt_prob,
                max_length=cfg.collator.max_length, released_patients=tcfg.quality_report_released_patients)
        status = "FINISHED"
    except TrainingPruned:
        status = "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = {"run_id": run_id, "global_step": global_step, "selection_metric": selection, "best_score": best_score,
                  "protocol_id": protocol.id,
                  "best_metrics": best_metrics, "final_metrics": last_metrics, "checkpoint_dir": str(ckpt_dir),
                  "best_checkpoint": str(best_dir) if best_dir.exists() else None, "quality": result_quality}
        if status == "FINISHED" and best_dir.exists():
            tracker.set_tags({f"best_{selection}": best_score, "best_epoch": best_metrics.get("epoch")})
            model_info = tracker.log_model(str(best_dir), best_score, {
                "data_source": cfg.data.source, "data_fingerprint": data_fingerprint, "run_id": run_id,
                "protocol_id": protocol.id, "selection_metric": selection, "val_loss": best_metrics.get("loss")},
                rescore=checkpoint_scorer(protocol, device, selection))
            result["model"] = model_info
        tracker.end(status)
    return result
