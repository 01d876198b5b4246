"""The training step and what it runs on: seeding, device and precision, the training loader (its
sampler resumable mid-epoch), AdamW, one optimizer step that refuses non-finite values, and the window
of losses logged every few steps. `promptehr.train` runs them; bench/throughput.py times them.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from promptehr.collator import EHRDataCollator, EHRPatientDataset, LengthBucketSampler, RowBucketSampler
from promptehr.config import Config
from promptehr.run_status import TrainingDiverged, ignore_stop_signals

__all__ = [
    "LOSS_PARTS",
    "LogWindow",
    "ResumableBatches",
    "WeightAverage",
    "autocast_context",
    "build_loader",
    "build_optimizer",
    "compiled_step_model",
    "epoch_batches",
    "resolve_device",
    "seed_everything",
    "training_step",
]


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
    train_loader = DataLoader(
        train_ds,
        batch_sampler=train_sampler,
        collate_fn=train_collator,
        num_workers=tcfg.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals if tcfg.num_workers else None,
    )
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


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging): after step t,
    average <- d_t * average + (1 - d_t) * weights with d_t = min(decay, (1 + t) / (10 + t)), so the
    first steps are not held near the random initialisation. Validation scores the average and
    best_model keeps it (`swapped_in`); checkpoints carry it (`state_dict`), so a resumed run
    continues the same average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": [a.detach().to("cpu", copy=True) for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"weight average of {len(state['average'])} tensors, the model has {len(self.average)}")
        with torch.no_grad():
            for a, saved in zip(self.average, state["average"]):
                a.copy_(saved)
        self.steps = int(state["steps"])

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block, its own weights again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)


@dataclass
class LogWindow:
    """Loss sums of the steps since the last logged one; a mid-epoch checkpoint keeps them, so a resumed
    run logs the same means as an uninterrupted one (the throughput clock starts anew)."""

    sums: torch.Tensor
    steps: int = 0
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, device, state: dict | None = None) -> LogWindow:
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
        tracker.log_metrics(
            {**{f"train/{k}": v for k, v in means.items()}, "train/learning_rate": lr, "train/rows_per_second": rate},
            step=step,
        )
        self.sums.zero_()
        self.steps, self.rows, self.started = 0, 0, time.perf_counter()
        return means
