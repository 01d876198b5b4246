"""Metric pieces shared by validation (`promptehr.validation`) and the quality report.

- compute_perplexity: exp of a mean token NLL;
- reconstruction_jaccard: reveal `prompt_prob` of each visit's codes, generate the rest, score
  Jaccard(generated - prompts, target - prompts), beside an oracle-length frequency baseline;
  reconstruction_jaccard_ranked scores the model under the baseline's own protocol (told how many
  codes are hidden, it guesses its most likely ones), the like-for-like comparison.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from promptehr.generate import SamplingConfig, generate_conditional_batch


def compute_perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean token NLL; NaN when there are no tokens."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def jaccard(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def compute_reconstruction_jaccard(
    model,
    tokenizer,
    patients,
    train_patients=None,
    prompt_prob=0.5,
    n_patients=100,
    seed=0,
    sampling: SamplingConfig | None = None,
) -> dict[str, float]:
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
