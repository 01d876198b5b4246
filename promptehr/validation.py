"""Validation: one fixed evaluation protocol per data split, and the held-out metrics it scores.

`ValidationProtocol(cfg, tokenizer, train_patients, val_patients)` draws the validation rows once,
from the held-out patients and the protocol's own settings and seed (`cfg.validation`), never from a
training knob (collator.*, training.seed). Its `id` hashes the patients of the split, those settings
and `collator.max_length` (what must match the model). `evaluate(model, device)` returns the `val/`
metrics; `next_visit_nll` is what selects models (best checkpoint, champion, tuning objective).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from promptehr.baselines import NextVisitBaselines, VisitPairs
from promptehr.collator import TASK_ID, TASK_TYPES, EHRDataCollator, EHRPatientDataset
from promptehr.metrics import compute_perplexity, compute_reconstruction_jaccard
from promptehr.patient_format import arrange_visits, pad_batch, unseen_labels, with_closing_token

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# A run that has not learned to copy the encoder into the decoder by its 3rd validation and 750th
# optimizer step is stuck: its reconstruction rows' perplexity stays near what a model that ignores the
# encoder scores there. Measured (bench/README.md, Learning to copy): stuck runs 0.09-0.26 of that level
# at epochs 2-4, healthy ones 0.002-0.012 by epoch 3 (750 steps) at 20,000 patients; a healthy run of
# 5,000 patients was still at 0.096 by its 3rd epoch (189 steps), hence the step count.
COPY_CHECK_EPOCH = 3
COPY_CHECK_STEPS = 750
COPY_RATIO_LIMIT = 0.05
SELECTION_METRIC = "next_visit_nll"  # lower is better
NEXT, FIRST = TASK_ID["next_visit_prediction"], TASK_ID["first_visit"]
TASK_KEYS = {
    "reconstruction": "reconstruction",
    "denoising": "denoising",
    "next_visit_prediction": "next_visit",
    "first_visit": "first_visit",
}


def split_digest(train_patients, val_patients) -> str:
    """sha256 of the split's content (ids, demographics, visit code sets): two splits of different
    patients never share it, even when their subject ids coincide (synthetic cohorts). One-way: it
    reveals nothing about a patient."""
    h = hashlib.sha256()
    for group in (train_patients, val_patients):
        for p in group:
            visits = ";".join(",".join(sorted(v)) for v in p.visits)
            h.update(f"{p.subject_id}|{p.age!r}|{p.sex}|{visits}\n".encode())
        h.update(b"#")
    return h.hexdigest()


def protocol_settings(cfg) -> dict:
    """The settings that make up a protocol: `cfg.validation` (but the batch size, which does not
    change the numbers) and `collator.max_length` (rows are cut to what the model takes)."""
    settings = {k: v for k, v in asdict(cfg.validation).items() if k != "batch_size"}
    return {"version": PROTOCOL_VERSION, "validation": settings, "max_length": cfg.collator.max_length}


def protocol_id(cfg, train_patients, val_patients) -> str:
    text = json.dumps({**protocol_settings(cfg), "split": split_digest(train_patients, val_patients)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ValidationProtocol:
    """The held-out rows every model of this split is scored on, drawn once with `validation.seed`.

    Per held-out patient (codes of each visit shuffled once, as in training): one whole-patient row,
    a denoising row with probability `validation.corruption_prob` (corrupted with the protocol's own
    span/deletion/replacement settings) else a clean reconstruction row; a next-visit row for EVERY
    visit k >= 1; a first-visit row. Next visits holding a code outside the training vocabulary are
    not scored (the model and the baselines leave out the same visits; the share is reported), and
    `<unk>` label tokens are left out of every perplexity (share reported).
    """

    def __init__(self, cfg, tokenizer, train_patients, val_patients):
        vcfg = cfg.validation
        self.cfg = cfg
        self.tok = tokenizer
        self.train_patients, self.val_patients = train_patients, val_patients
        self.id = protocol_id(cfg, train_patients, val_patients)
        self.collator = EHRDataCollator(
            tokenizer,
            lambda_poisson=vcfg.lambda_poisson,
            mask_probability=vcfg.mask_probability,
            del_probability=vcfg.del_probability,
            rep_probability=vcfg.rep_probability,
            corruption_prob=vcfg.corruption_prob,
            seed=vcfg.seed,
        )
        dataset = EHRPatientDataset(val_patients, tokenizer, cfg.collator.max_length)
        self.rows = self._draw_rows(dataset, np.random.default_rng([vcfg.seed, PROTOCOL_VERSION]))
        self.pairs, self.n_next_visits, self.n_excluded = self._scored_visits(dataset)
        self.baselines = NextVisitBaselines.fit(train_patients, tokenizer.codes).score(self.pairs)
        self.copy_frequency_perplexity = self._copy_frequency_perplexity(train_patients)
        self.selection_metric = SELECTION_METRIC if self.pairs.n_events else "perplexity"
        if not self.pairs.n_events:
            logger.warning("no held-out patient has a scorable next visit: models are selected by val/perplexity")

    def _draw_rows(self, dataset, rng) -> list[tuple]:
        """(encoder ids, labels, first hidden position, task id, age, sex, unseen mask, event) per row;
        event: the index of a scored next visit, else -1 (filled in by `_scored_visits`)."""
        rows = []
        for i in range(len(dataset)):
            _, visits, age, sex = dataset[i]
            visits = arrange_visits(self.tok, visits, rng)
            whole = "denoising" if rng.random() < self.collator.corruption_prob else "reconstruction"
            plan = [(TASK_ID[whole], -1), *((NEXT, k) for k in range(1, len(visits))), (FIRST, 0)]
            for task, k in plan:
                enc, labels, start, _ = self.collator.build_row(visits, task, k, rng, shuffle=False)
                rows.append([enc, labels, start, task, age, sex, unseen_labels(self.tok, enc, labels), (i, k)])
        rows.sort(key=lambda r: (len(r[1]), len(r[0])))  # little padding per batch
        return rows

    def _scored_visits(self, dataset) -> tuple[VisitPairs, int, int]:
        """Mark the next-visit rows whose visit k holds no `<unk>` as scored events; their (visit k,
        visit k-1) pairs for the baselines."""
        tok, pairs, n_next = self.tok, [], 0
        for row in self.rows:
            i, k = row[7]
            row[7] = -1
            if row[3] != NEXT:
                continue
            n_next += 1
            visits = dataset.visits[i]
            if (visits[k] == tok.unk_token_id).any():
                continue
            row[7] = len(pairs)
            names = [[tok.id_to_token[c] for c in v] for v in (visits[k], visits[k - 1])]
            p = self.val_patients[i]
            pairs.append((names[0], names[1], p.age, p.sex))
        # a set of n codes in random order: its sequence NLL less log n! (an upper bound); ordered: exact
        self.log_fact = np.array([0.0 if tok.ordered else math.lgamma(len(visit) + 1) for visit, *_ in pairs])
        index = {c: j for j, c in enumerate(tok.codes)}
        return VisitPairs.from_visits(pairs, index), n_next, n_next - len(pairs)

    def _copy_frequency_perplexity(self, train_patients) -> float:
        """Perplexity of the reconstruction rows' codes under the training code frequencies (a
        categorical over codes, add-one smoothed): what a model scores there that ignores the encoder."""
        counts = np.ones(len(self.tok))
        for p in train_patients:
            for v in p.visits:
                for c in v:
                    counts[self.tok.encode_code(c)] += 1  # a code outside the vocabulary counts for <unk>
        counts[: self.tok.n_special] = 0  # never a label of these rows' codes
        with np.errstate(divide="ignore"):
            log_q = np.log(counts / counts.sum())
        labels = np.concatenate([r[1] for r in self.rows if r[3] == TASK_ID["reconstruction"]] or [np.zeros(0, int)])
        labels = labels[labels >= self.tok.n_special]
        return float(np.exp(-log_q[labels].mean())) if len(labels) else float("nan")

    def batches(self, device):
        size = self.cfg.validation.batch_size
        for s in range(0, len(self.rows), size):
            chunk = self.rows[s : s + size]
            batch = pad_batch(
                self.tok,
                [r[0] for r in chunk],
                [r[1] for r in chunk],
                [r[2] for r in chunk],
                [r[3] for r in chunk],
                [r[4] for r in chunk],
                [r[5] for r in chunk],
                unseen_rows=[r[6] for r in chunk],
            )
            batch["event"] = torch.tensor([r[7] for r in chunk], dtype=torch.long)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self, model, device, autocast=None, jaccard: bool = True) -> dict[str, float]:
        """The `val/` metrics of `model` on this protocol (metric names without the prefix)."""
        was_training = model.training
        model.eval()
        n_tasks = len(TASK_TYPES)
        sums = dict.fromkeys(("loss", "lm_loss", "age_loss", "sex_loss", "rows"), 0.0)
        unseen_nll = unseen_n = unk_n = label_codes = tpl_nll = tpl_n = 0.0
        task_nll, task_n = np.zeros(n_tasks), np.zeros(n_tasks)
        visit_nll = np.zeros(self.pairs.n_events)
        try:
            for batch in self.batches(device):
                with (autocast or contextlib.nullcontext)():
                    out = model(**batch)
                rows = batch["labels"].shape[0]
                for key in ("loss", "lm_loss", "age_loss", "sex_loss"):
                    sums[key] += float(out[key]) * rows
                sums["rows"] += rows
                labels = batch["labels"]
                nll = F.cross_entropy(out["logits"].float().transpose(1, 2), labels.clamp(min=0), reduction="none")
                code = labels >= self.tok.n_special
                unk_n += int((labels == self.tok.unk_token_id).sum())
                label_codes += int(code.sum())
                seen_not = code & batch["unseen_mask"]
                unseen_nll += float(nll[seen_not].sum())
                unseen_n += int(seen_not.sum())
                onehot = F.one_hot(batch["task_type"], n_tasks).float()  # (B, tasks)
                task_nll += (onehot.T @ (nll * code).sum(1)).cpu().numpy()
                task_n += (onehot.T @ code.sum(1).float()).cpu().numpy()
                event = batch["event"]
                scored = event >= 0
                if scored.any():
                    target = batch["target_mask"] & scored.unsqueeze(1)  # visit k's codes
                    tpl_nll += float(nll[target].sum())
                    tpl_n += int(target.sum())
                    per_row = (nll * with_closing_token(target)).sum(1)  # ... and its </v>
                    visit_nll[event[scored].cpu().numpy()] = per_row[scored].cpu().numpy()
        finally:
            model.train(was_training)
        metrics = {key: sums[key] / max(sums["rows"], 1) for key in ("loss", "lm_loss", "age_loss", "sex_loss")}
        metrics["perplexity"] = compute_perplexity(unseen_nll, unseen_n)
        for t, name in enumerate(TASK_TYPES):
            metrics[f"perplexity_{TASK_KEYS[name]}"] = compute_perplexity(task_nll[t], task_n[t])
        metrics["perplexity_reconstruction_frequency"] = self.copy_frequency_perplexity
        metrics["unk_label_share"] = unk_n / max(unk_n + label_codes, 1)
        metrics.update(self._next_visit_metrics(visit_nll, tpl_nll, tpl_n))
        if jaccard and self.cfg.validation.jaccard_patients > 0:
            metrics.update(
                compute_reconstruction_jaccard(
                    model,
                    self.tok,
                    self.val_patients,
                    self.train_patients,
                    prompt_prob=self.cfg.validation.prompt_prob,
                    n_patients=self.cfg.validation.jaccard_patients,
                    seed=self.cfg.validation.seed,
                )
            )
        return metrics

    def _next_visit_metrics(self, visit_nll, tpl_nll, tpl_n) -> dict[str, float]:
        nan = float("nan")
        b = self.baselines
        have = self.pairs.n_events > 0
        return {
            "next_visit_nll": float(np.mean(visit_nll - self.log_fact)) if have else nan,
            "next_visit_nll_frequency": float(b["frequency"].mean()) if have else nan,
            "next_visit_nll_stratified": float(b["stratified"].mean()) if have else nan,
            "next_visit_nll_repeat": float(b["repeat"].mean()) if have else nan,
            "next_visits": self.pairs.n_events,
            "next_visit_excluded_share": self.n_excluded / max(self.n_next_visits, 1),
            "tpl": compute_perplexity(tpl_nll, tpl_n),
            "tpl_frequency_baseline": float(np.exp(b["code_frequency"].mean())) if have else nan,
            "tpl_repeat_baseline": float(np.exp(b["code_repeat"].mean())) if have else nan,
        }


def copy_ratio(metrics: dict) -> float:
    """The reconstruction rows' perplexity over that of a model that ignores the encoder (copying: near 0)."""
    return metrics["perplexity_reconstruction"] / metrics["perplexity_reconstruction_frequency"]


def copy_warning(metrics: dict, steps: int) -> str | None:
    """A one-line warning when the run has not learned to copy by validation epoch `COPY_CHECK_EPOCH`
    and optimizer step `COPY_CHECK_STEPS` (`steps`: the steps so far; a stuck run's next-visit
    predictions stay near the frequency prior), else None."""
    ratio = copy_ratio(metrics)
    if metrics.get("epoch", 0) < COPY_CHECK_EPOCH or steps < COPY_CHECK_STEPS or ratio < COPY_RATIO_LIMIT:
        return None
    return (
        f"training looks stuck: after {metrics['epoch']} epochs ({steps} steps) the reconstruction rows' perplexity is "
        f"{metrics['perplexity_reconstruction']:.1f}, {ratio:.0%} of the "
        f"{metrics['perplexity_reconstruction_frequency']:.0f} "
        f"a model that ignores the encoder scores (healthy runs: below {COPY_RATIO_LIMIT:.0%}); the model has not "
        "learned to copy what the encoder shows. Try a lower training.learning_rate or another training.seed"
    )


def repeat_warning(metrics: dict) -> str | None:
    """A one-line warning when a model (its validation `metrics`) predicts held-out next visits no better
    than the repeat baseline ("the previous visit's codes, mixed with the next-visit prior"), else None."""
    model, repeat = metrics.get("next_visit_nll", math.nan), metrics.get("next_visit_nll_repeat", math.nan)
    if not (math.isfinite(model) and math.isfinite(repeat)) or model < repeat:
        return None
    return (
        f"the best model predicts held-out next visits no better than repeating the previous visit: "
        f"{model:.2f} nats per visit against the repeat baseline's {repeat:.2f} (val/next_visit_nll_repeat); "
        "its synthetic next visits are no more realistic than that baseline's"
    )
