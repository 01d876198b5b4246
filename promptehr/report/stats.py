"""Small statistics the quality report shares: correlation, count distances, multi-hot matrices, and
the patient bootstrap (multinomial resampling weights, weighted AUROC, percentile intervals).
Inputs are plain arrays and code sets; nothing here knows about models."""

from __future__ import annotations

import numpy as np


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def count_distances(a, b) -> tuple[float, float]:
    """Total variation and Wasserstein-1 distances between two samples of non-negative integers."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    size = int(max(a.max(initial=0), b.max(initial=0))) + 1
    p = np.bincount(a, minlength=size) / max(len(a), 1)
    q = np.bincount(b, minlength=size) / max(len(b), 1)
    return float(0.5 * np.abs(p - q).sum()), float(np.abs(np.cumsum(p) - np.cumsum(q)).sum())


def multi_hot(rows, index: dict[str, int]) -> np.ndarray:
    """(len(rows), len(index)) float32 matrix: 1 where a row holds the item; items not in `index` are ignored."""
    x = np.zeros((len(rows), len(index)), dtype=np.float32)
    for r, items in enumerate(rows):
        cols = [index[c] for c in items if c in index]
        x[r, cols] = 1.0
    return x


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) resampling counts: row b says how often each of n units is drawn in resample b
    (n draws with replacement). Weighting by these counts equals computing on the resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) if n else np.zeros((n_boot, 0))


def weighted_auroc(scores, labels, weights) -> np.ndarray:
    """ROC AUC of `scores` for binary `labels` under each row of `weights` ((B, n) example weights),
    ties counted half, as `sklearn.metrics.roc_auc_score(labels, scores, sample_weight=w)`; NaN
    where a row weighs no positive or no negative. Vectorised over B: the bootstrap's inner loop."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    left, right = np.searchsorted(s, scores, "left"), np.searchsorted(s, scores, "right")
    neg = weights * ~labels
    cum = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(neg[:, order], axis=1)], axis=1)
    below = cum[:, left]  # negative weight with a lower score than each example
    tied = cum[:, right] - below  # ... with the same score
    pos = weights * labels
    w_pos, w_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * tied)).sum(1) / (w_pos * w_neg)
    return np.where((w_pos > 0) & (w_neg > 0), auc, np.nan)


def normal_interval(point: float, values, z: float = 1.959964) -> tuple[float, float]:
    """`point` +- z bootstrap standard deviations (NaN replicates left out). For statistics that noise
    drags one way, like an R-squared between two samples: resampling adds noise on top of the sample's
    own, so the replicates sit below the point and a percentile interval can miss it; their spread
    still measures how much the figure varies from sample to sample."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2 or not np.isfinite(point):
        return float("nan"), float("nan")
    sd = float(values.std(ddof=1))
    return point - z * sd, point + z * sd


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates left out; NaN if none is finite)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
