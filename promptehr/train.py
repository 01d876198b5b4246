"""Training recipe: config -> data -> tokenizer -> datasets -> model -> AdamW + linear schedule -> loop.

`train(cfg, tracker, on_validate)` is a plain function: entry points only parse arguments, build the
tracker and call it. Validation (held-out patients) every `validate_every_n_epochs`; checkpoints
`best_model`, `last` and `epoch_N` folders; `training.resume_from` continues in the same MLflow run.
`on_validate(epoch, metrics)` lets tuning report and prune; raising `TrainingPruned` there ends the
run with status KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from promptehr.data import load_patients, split_patients
from promptehr.evaluate import run_quality_report
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.metrics import compute_reconstruction_jaccard, evaluate_loss, next_visit_baselines
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker

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


def split_fingerprint(train_patients, val_patients) -> str:
    """Hash of the split (for checks on resume); reveals nothing about the patients."""
    h = hashlib.sha256()
    for group in (train_patients, val_patients):
        for p in group:
            h.update(p.subject_id.encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def build_loaders(cfg: Config, tokenizer, train_patients, val_patients):
    tcfg = cfg.training
    train_ds = EHRPatientDataset(train_patients, tokenizer, cfg.collator.max_length)
    val_ds = EHRPatientDataset(val_patients, tokenizer, cfg.collator.max_length)
    train_collator = EHRDataCollator.from_config(tokenizer, cfg.collator, seed=tcfg.seed)
    # validation rows are drawn the same way every time (seeded, epoch fixed at 0)
    val_collator = EHRDataCollator.from_config(tokenizer, cfg.collator, seed=tcfg.seed + 1)
    if tcfg.bucket_by_length:  # rows (not patients) of similar length batched together
        train_sampler = RowBucketSampler(train_ds, train_collator, tcfg.batch_size, seed=tcfg.seed)
    else:  # patients in random batches
        train_sampler = LengthBucketSampler(train_ds.lengths, tcfg.batch_size, seed=tcfg.seed, window=1)
    val_sampler = LengthBucketSampler(val_ds.lengths, tcfg.eval_batch_size, seed=0, window=10**9, shuffle=False)
    common = {"num_workers": tcfg.num_workers, "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, collate_fn=train_collator, **common)
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, collate_fn=val_collator, **common)
    return train_loader, val_loader, train_sampler, train_collator, (train_ds.report + val_ds.report)


def build_optimizer(model, tcfg, device):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "layernorm" in name.lower() or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CUDA and CPU); the per-parameter loop costs ~6% of a CPU base step
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


def validate(model, val_loader, device, cfg, tokenizer, train_patients, val_patients, autocast, epoch) -> dict:
    tcfg = cfg.training
    metrics = evaluate_loss(model, val_loader, device, autocast)
    if not tcfg.compute_tpl:
        metrics.pop("tpl", None)
    if tcfg.compute_reconstruction_jaccard:
        metrics.update(compute_reconstruction_jaccard(
            model, tokenizer, val_patients, train_patients, prompt_prob=tcfg.prompt_prob,
            n_patients=tcfg.jaccard_patients, seed=tcfg.seed))
    return metrics


def sample_patients(model, tokenizer, demographics, n, seed) -> list[dict]:
    """A few synthetic patients, demographics drawn from the training (sex, age bin) histogram."""
    if n <= 0:
        return []
    ages, sexes = sample_demographics(demographics, n, seed)
    generated = generate_patients(model, tokenizer, ages, sexes, SamplingConfig(max_visits=8), seed=seed)
    return [{"age": p.age, "sex": p.sex, "visits": p.visits} for p in generated]


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
    train_patients, val_patients = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    fingerprint = split_fingerprint(train_patients, val_patients)
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

    train_loader, val_loader, train_sampler, train_collator, ds_report = build_loaders(cfg, tokenizer, train_patients, val_patients)
    model = PromptBartWithDemographicPrediction(tokenizer, cfg).to(device)
    optimizer = build_optimizer(model, tcfg, device)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * tcfg.num_epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(tcfg.warmup_steps, total_steps), max(total_steps, 1))

    start_epoch, global_step, best_val_loss, run_id = 0, 0, math.inf, None
    if resume:
        from safetensors.torch import load_model

        load_model(model, str(Path(tcfg.resume_from) / "model.safetensors"), device=str(device))
        load_training_state(tcfg.resume_from, optimizer, scheduler)
        start_epoch, global_step = resume["epoch"] + 1, resume["global_step"]
        best_val_loss, run_id = resume.get("best_val_loss", math.inf), resume.get("run_id")
        logger.info("resuming from %s at epoch %d (step %d)", tcfg.resume_from, start_epoch + 1, global_step)
    step_model = compiled_step_model(model, tcfg)

    run_id = tracker.start(run_id)
    n_params = sum(p.numel() for p in model.parameters())
    data_fingerprint = hashlib.sha256(f"{cfg.data.source}|{cfg.data.path}|{fingerprint}".encode()).hexdigest()[:16]
    if not resume:
        tracker.log_params(flatten(cfg))
        tracker.set_tags({
            "data.source": cfg.data.source, "data_fingerprint": data_fingerprint, "split_fingerprint": fingerprint,
            "n_parameters": n_params, "device": str(device), "vocab_size": len(tokenizer),
            **{f"data.{k}": v for k, v in report.counts.items()},
            **{f"dataset.{k}": v for k, v in ds_report.items()},
            **{f"version.{k}": v for k, v in package_versions().items()},
            "git_commit": git_commit() or "unknown",
        })
        tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
        tracker.log_dict({"codes": tokenizer.codes}, "config/vocab.json")
        tracker.log_dataset(cfg.data, train_patients, val_patients, fingerprint)
    baselines = next_visit_baselines(train_patients, val_patients, tokenizer.codes)
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
            "epoch": epoch, "global_step": global_step, "metrics": metrics, "best_val_loss": best_val_loss,
            "best_metrics": best_metrics, "seed": tcfg.seed, "run_id": run_id, "split_fingerprint": fingerprint,
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
                metrics = validate(step_model, val_loader, device, cfg, tokenizer, train_patients, val_patients, autocast, epoch)
                metrics.update(baselines)
                metrics["epoch"] = epoch + 1
                last_metrics = metrics
                tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=global_step)
                logger.info("validation epoch %d: loss %.4f, perplexity %.2f, tpl %.2f (frequency %.2f, repeat %.2f), "
                            "jaccard %.3f sampled, %.3f ranked (baseline %.3f)", epoch + 1, metrics["loss"],
                            metrics["perplexity"], metrics.get("tpl", float("nan")), metrics["tpl_frequency_baseline"],
                            metrics["tpl_repeat_baseline"], metrics.get("reconstruction_jaccard", float("nan")),
                            metrics.get("reconstruction_jaccard_ranked", float("nan")),
                            metrics.get("reconstruction_jaccard_baseline", float("nan")))
                samples = sample_patients(model, tokenizer, demographics, cfg.tracking.n_sample_patients, tcfg.seed + epoch)
                if samples:
                    tracker.log_dict({"epoch": epoch + 1, "synthetic_patients": samples}, f"samples/epoch_{epoch + 1:03d}.json")
                if metrics["loss"] < best_val_loss:
                    best_val_loss, best_metrics = metrics["loss"], dict(metrics)
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
                n_patients=tcfg.quality_report_patients, seed=tcfg.seed, prompt_prob=tcfg.prompt_prob,
                max_length=cfg.collator.max_length)
        status = "FINISHED"
    except TrainingPruned:
        status = "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = {"run_id": run_id, "global_step": global_step, "best_val_loss": best_val_loss,
                  "best_metrics": best_metrics, "final_metrics": last_metrics, "checkpoint_dir": str(ckpt_dir),
                  "best_checkpoint": str(best_dir) if best_dir.exists() else None, "quality": result_quality}
        if status == "FINISHED" and best_dir.exists():
            tracker.set_tags({"best_val_loss": best_val_loss})
            model_info = tracker.log_model(str(best_dir), best_val_loss, {
                "data_source": cfg.data.source, "data_fingerprint": data_fingerprint, "run_id": run_id})
            result["model"] = model_info
        tracker.end(status)
    return result
