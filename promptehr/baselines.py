"""Baselines for a next visit, fitted on TRAINING patients' next visits (k >= 1) only.

They say what a held-out next-visit score is worth (validation, bench/quality.py):
  - set baselines (nats per visit, like `val/next_visit_nll`): independent Bernoulli per code,
    conditioned on a non-empty visit (the visit exists), with the frequency prior q (share of training
    next visits holding each code), its age/sex-stratified version, or "repeat" p = a * [c in visit
    k-1] + (1 - a) * q with `a` fitted by maximum likelihood on the training next visits;
  - per-code baselines (like `val/tpl`): a categorical over codes, the prior or a * uniform(visit
    k-1) + (1 - a) * prior, `a` fitted the same way.
Codes outside the training vocabulary are never scored (callers leave their visits out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGE_BANDS = (0.0, 1.0, 18.0, 45.0, 65.0, 80.0)  # lower edges of the strata of the stratified prior


@dataclass
class VisitPairs:
    """Next visits as index arrays: per event the codes of visit k and of visit k-1 (vocabulary
    indices), flattened with their event number; and each event's stratum."""

    n_events: int
    y_event: np.ndarray  # (nnz_y,) event of each code of visit k
    y_code: np.ndarray  # (nnz_y,) its code index
    y_in_prev: np.ndarray  # (nnz_y,) bool: the code was in visit k-1
    prev_event: np.ndarray  # (nnz_prev,)
    prev_code: np.ndarray  # (nnz_prev,)
    stratum: np.ndarray  # (n_events,)

    @classmethod
    def from_visits(cls, pairs, index: dict[str, int]) -> VisitPairs:
        """`pairs`: (visit k codes, visit k-1 codes, age, sex) per event; unknown codes are dropped."""
        ye, yc, yp, pe, pc, st = [], [], [], [], [], []
        pairs = list(pairs)
        for e, (visit, prev, age, sex) in enumerate(pairs):
            prev_idx = sorted({index[c] for c in prev if c in index})
            pe += [e] * len(prev_idx)
            pc += prev_idx
            prev_set = set(prev_idx)
            for c in sorted({index[c] for c in visit if c in index}):
                ye.append(e)
                yc.append(c)
                yp.append(c in prev_set)
            st.append(stratum(age, sex))
        as_int = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return cls(len(pairs), as_int(ye), as_int(yc), np.asarray(yp, dtype=bool), as_int(pe), as_int(pc), as_int(st))


def stratum(age: float, sex: str) -> int:
    """Index of the (sex, age band) stratum: 2 sexes x len(AGE_BANDS) bands."""
    band = int(np.searchsorted(AGE_BANDS, age, side="right")) - 1
    return (0 if sex == "M" else 1) * len(AGE_BANDS) + max(band, 0)


N_STRATA = 2 * len(AGE_BANDS)


def next_visit_pairs(patients, first: bool = False):
    """(visit k, visit k-1, age, sex) for every next visit k >= 1 of `patients` (with `first`: every
    first visit, with an empty visit k-1)."""
    for p in patients:
        for k in range(1) if first else range(1, len(p.visits)):
            yield p.visits[k], (p.visits[k - 1] if k else []), p.age, p.sex


def _log1m(p):
    return np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12))


def bernoulli_set_nll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log P(set y) for independent Bernoulli(p) per code, conditioned on a non-empty set; dense
    (events, C) arrays. The reference the sparse scorer below is tested against."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    log1m = np.log1p(-p)
    ll = (y * (np.log(p) - log1m)).sum(-1) + log1m.sum(-1)
    log_nonempty = np.log(-np.expm1(log1m.sum(-1)))
    return -(ll - log_nonempty)


def set_nll(prior: np.ndarray, pairs: VisitPairs, a: float = 0.0) -> np.ndarray:
    """Per event -log P(visit k) under p = a * [c in visit k-1] + (1 - a) * q, Bernoulli per code,
    conditioned on a non-empty visit; `prior` is (C,) or per stratum (N_STRATA, C). Sparse: the
    cost is O(C * strata + codes of the visits)."""
    q = np.atleast_2d(prior)
    st = pairs.stratum if q.shape[0] > 1 else np.zeros(pairs.n_events, dtype=np.int64)
    base = (1 - a) * q  # p of a code not in visit k-1
    total = _log1m(base).sum(1)[st]  # sum_c log(1 - p_c), before visit k-1's codes
    pb = base[st[pairs.prev_event], pairs.prev_code]
    np.add.at(total, pairs.prev_event, _log1m(a + pb) - _log1m(pb))
    p_y = base[st[pairs.y_event], pairs.y_code] + a * pairs.y_in_prev
    ll = total.copy()
    np.add.at(ll, pairs.y_event, np.log(np.clip(p_y, 1e-12, 1.0)) - _log1m(p_y))
    return -(ll - np.log(-np.expm1(total)))


def visit_prior(pairs: VisitPairs, n_codes: int, alpha: float = 0.5, strength: float = 0.0) -> np.ndarray:
    """Share of the events' visits holding each code, add-`alpha` smoothed: (C,); with `strength` > 0,
    per stratum (N_STRATA, C), shrunk toward the overall prior as if it were `strength` visits."""
    counts = np.bincount(pairs.y_code, minlength=n_codes).astype(np.float64)
    overall = (counts + alpha) / (pairs.n_events + 2 * alpha)
    if strength <= 0:
        return overall
    per = np.zeros((N_STRATA, n_codes))
    np.add.at(per, (pairs.stratum[pairs.y_event], pairs.y_code), 1.0)
    n = np.bincount(pairs.stratum, minlength=N_STRATA).astype(np.float64)[:, None]
    return (per + strength * overall) / (n + strength)


def fit_repeat_weight(prior: np.ndarray, pairs: VisitPairs) -> float:
    """The `a` in [0, 1) of the repeat baseline with the least mean NLL on `pairs` (convex in a)."""

    def loss(a):
        return set_nll(prior, pairs, a).mean()

    grid = np.linspace(0.0, 0.99, 100)
    a = grid[int(np.argmin([loss(g) for g in grid]))]
    lo, hi = max(0.0, a - 0.01), min(0.999, a + 0.01)
    for _ in range(40):  # golden-section refinement
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, m2) if loss(m1) < loss(m2) else (m1, hi)
    return float((lo + hi) / 2)


def code_nll(prior: np.ndarray, pairs: VisitPairs, a: float = 0.0) -> np.ndarray:
    """Per code of visit k: -log of a * uniform(visit k-1) + (1 - a) * prior, `prior` a categorical
    over codes (C,): the per-code baselines of TPL."""
    prev_size = np.bincount(pairs.prev_event, minlength=pairs.n_events)[pairs.y_event]
    repeat = np.where(prev_size > 0, pairs.y_in_prev / np.maximum(prev_size, 1), 0.0)
    return -np.log(a * repeat + (1 - a) * prior[pairs.y_code])


def fit_code_repeat_weight(prior: np.ndarray, pairs: VisitPairs) -> float:
    grid = np.linspace(0.0, 0.99, 100)
    return float(grid[int(np.argmin([code_nll(prior, pairs, a).mean() for a in grid]))])


@dataclass
class NextVisitBaselines:
    """Every baseline, fitted once on training next visits; `score(pairs)` gives per-event set NLLs
    and per-code NLLs of held-out next visits."""

    prior: np.ndarray  # (C,) Bernoulli per code
    stratified: np.ndarray  # (N_STRATA, C)
    repeat_weight: float
    code_prior: np.ndarray  # (C,) categorical over codes
    code_repeat_weight: float

    @classmethod
    def fit(cls, train_patients, codes: list[str], first: bool = False) -> NextVisitBaselines:
        """Fitted on the training patients' next visits (with `first`, or when no training patient
        comes back: on their first visits)."""
        index = {c: i for i, c in enumerate(codes)}
        pairs = VisitPairs.from_visits(next_visit_pairs(train_patients, first), index)
        if pairs.n_events == 0:
            pairs = VisitPairs.from_visits(next_visit_pairs(train_patients, first=True), index)
        prior = visit_prior(pairs, len(codes))
        counts = np.bincount(pairs.y_code, minlength=len(codes)) + 1.0
        code_prior = counts / counts.sum()
        return cls(
            prior,
            visit_prior(pairs, len(codes), strength=20.0),
            fit_repeat_weight(prior, pairs),
            code_prior,
            fit_code_repeat_weight(code_prior, pairs),
        )

    def score(self, pairs: VisitPairs) -> dict[str, np.ndarray]:
        return {
            "frequency": set_nll(self.prior, pairs),
            "stratified": set_nll(self.stratified, pairs),
            "repeat": set_nll(self.prior, pairs, self.repeat_weight),
            "code_frequency": code_nll(self.code_prior, pairs),
            "code_repeat": code_nll(self.code_prior, pairs, self.code_repeat_weight),
        }
