"""Metrics on held-out patients (PROMPTEHR.md section 4), each beside a baseline that says what good means.

- perplexity: exp(mean NLL over the code tokens of the labels) on all validation rows;
- tpl: exp(mean NLL of the hidden visit's codes) on next-visit rows (target absent from the encoder),
  beside a code-frequency prior and a "repeat the previous visit" mixture scored on the same codes;
- reconstruction_jaccard: reveal `prompt_prob` of each visit's codes, generate the rest, score
  Jaccard(generated - prompts, target - prompts), beside an oracle-length frequency baseline;
  reconstruction_jaccard_ranked scores the model under the baseline's own protocol (told how many
  codes are hidden, it guesses its most likely ones), the like-for-like comparison.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from promptehr.collator import TASK_ID
from promptehr.generate import SamplingConfig, generate_conditional_batch

NEXT_VISIT = TASK_ID["next_visit_prediction"]


class MetricsTracker:
    """Running sums of named values, weighted by a count (tokens, rows)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def update(self, weight: float = 1.0, **values) -> None:
        for name, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().item()
            self.sums[name] += float(value) * weight
            self.counts[name] += weight

    def get_average(self, name: str) -> float:
        return self.sums[name] / self.counts[name] if self.counts[name] else float("nan")

    def averages(self) -> dict[str, float]:
        return {name: self.get_average(name) for name in self.sums}


def compute_perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean token NLL; NaN when there are no tokens."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def _move(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, loader, device, autocast=None) -> dict[str, float]:
    """One pass over `loader`: val loss parts (row-weighted), perplexity over code tokens and TPL."""
    model.eval()
    tracker = MetricsTracker()
    code_nll = code_n = tpl_nll = tpl_n = 0.0
    n_special = model.n_special
    for batch in loader:
        batch = _move(batch, device)
        with (autocast or contextlib.nullcontext)():
            out = model(**batch)
        labels = batch["labels"]
        nll = F.cross_entropy(out["logits"].float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        codes = labels >= n_special
        code_nll += float(nll[codes].sum())
        code_n += int(codes.sum())
        target = batch["target_mask"] & (batch["task_type"] == NEXT_VISIT).unsqueeze(1)
        tpl_nll += float(nll[target].sum())
        tpl_n += int(target.sum())
        rows = labels.shape[0]
        tracker.update(rows, loss=out["loss"], lm_loss=out["lm_loss"], age_loss=out["age_loss"], sex_loss=out["sex_loss"])
    metrics = tracker.averages()
    metrics["perplexity"] = compute_perplexity(code_nll, code_n)
    metrics["tpl"] = compute_perplexity(tpl_nll, tpl_n)
    metrics["tpl_tokens"] = tpl_n
    return metrics


def compute_temporal_perplexity(model, loader, device) -> float:
    """TPL alone (see `evaluate_loss`, which computes it in the same pass as the loss)."""
    return evaluate_loss(model, loader, device)["tpl"]


def code_frequencies(patients, codes: list[str], smoothing: float = 1.0) -> np.ndarray:
    """Smoothed share of visits holding each code (training patients only)."""
    index = {c: i for i, c in enumerate(codes)}
    counts = np.full(len(codes), smoothing, dtype=np.float64)
    for p in patients:
        for v in p.visits:
            for c in v:
                if c in index:
                    counts[index[c]] += 1
    return counts / counts.sum()


def next_visit_baselines(train_patients, val_patients, codes: list[str]) -> dict[str, float]:
    """Per-code perplexity of every held-out next visit (k >= 1) under the code-frequency prior and
    under `a * uniform(previous visit) + (1 - a) * prior` with `a` at its best on these visits
    (so the baseline is as strong as it gets). Scores the same codes TPL scores."""
    prior = code_frequencies(train_patients, codes)
    index = {c: i for i, c in enumerate(codes)}
    unk = prior.min()
    rows = []  # (prior prob, repeat indicator / |previous visit|) per target code
    for p in val_patients:
        for k in range(1, len(p.visits)):
            prev = set(p.visits[k - 1])
            for c in p.visits[k]:
                q = prior[index[c]] if c in index else unk
                rows.append((q, (c in prev) / len(prev)))
    if not rows:
        return {"tpl_frequency_baseline": float("nan"), "tpl_repeat_baseline": float("nan")}
    q, r = np.array(rows).T
    best = min(float(np.mean(-np.log(a * r + (1 - a) * q))) for a in np.linspace(0.0, 0.95, 20))
    return {"tpl_frequency_baseline": float(np.exp(np.mean(-np.log(q)))), "tpl_repeat_baseline": float(np.exp(best))}


def jaccard(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def compute_reconstruction_jaccard(model, tokenizer, patients, train_patients=None, prompt_prob=0.5,
                                   n_patients=100, seed=0, sampling: SamplingConfig | None = None) -> dict[str, float]:
    """Prompt-aware reconstruction Jaccard over up to `n_patients` held-out patients (revealed codes
    excluded from both sides), and the same score for the most frequent training codes when told how
    many codes are hidden (an oracle-length baseline).

    The sampled visit (temperature 1, the model choosing its own length) can score below the baseline
    while the model knows more: sampling spreads its guesses over plausible codes, and the baseline is told the length.
    `reconstruction_jaccard_ranked` gives the model the baseline's protocol: the n codes it finds most
    likely to come next after the revealed ones, n the number hidden."""
    rng = np.random.default_rng(seed)
    chosen = [patients[i] for i in sorted(rng.choice(len(patients), min(n_patients, len(patients)), replace=False))]
    results = generate_conditional_batch(model, tokenizer, chosen, prompt_prob, sampling, seed)
    ranked = [c for c, _ in Counter(c for p in (train_patients or []) for v in p.visits for c in v).most_common()]
    scores, model_ranked, base = [], [], []
    for res in results:
        for prompts, gen, likely, target in zip(res["prompts"], res["generated"], res["ranked"], res["target"]):
            shown = set(prompts)
            tgt_new = set(target) - shown
            score = jaccard(set(gen) - shown, tgt_new)
            if score is None:
                continue
            scores.append(score)
            model_ranked.append(jaccard(set(likely[: len(tgt_new)]), tgt_new))
            guess = [c for c in ranked if c not in shown][: len(tgt_new)]
            base.append(jaccard(set(guess), tgt_new))
    return {
        "reconstruction_jaccard": float(np.mean(scores)) if scores else float("nan"),
        "reconstruction_jaccard_ranked": float(np.mean(model_ranked)) if model_ranked else float("nan"),
        "reconstruction_jaccard_baseline": float(np.mean(base)) if base and ranked else float("nan"),
        "reconstruction_jaccard_visits": len(scores),
    }
