"""Next-visit baselines: proper set distributions, fitted on training next visits only."""

import numpy as np
import pytest

from promptehr.baselines import (
    N_STRATA,
    NextVisitBaselines,
    VisitPairs,
    bernoulli_set_nll,
    fit_repeat_weight,
    set_nll,
    stratum,
    visit_prior,
)
from promptehr.schema import Patient


def test_bernoulli_set_probabilities_sum_to_one_over_nonempty_sets():
    p = np.array([0.1, 0.5, 0.02])
    subsets = np.array([[(m >> j) & 1 for j in range(3)] for m in range(1, 8)], dtype=float)
    total = np.exp(-bernoulli_set_nll(np.broadcast_to(p, subsets.shape), subsets)).sum()
    assert total == pytest.approx(1.0, abs=1e-9)


def random_pairs(rng, n, codes, a=0.0, prior=None):
    """Events (visit k, visit k-1, age, sex) drawn from the repeat model with weight `a`."""
    prior = rng.uniform(0.01, 0.2, len(codes)) if prior is None else prior
    out = []
    while len(out) < n:
        prev = [c for c in codes if rng.random() < 0.2]
        p = a * np.isin(codes, prev) + (1 - a) * prior
        visit = [c for c, pc in zip(codes, p) if rng.random() < pc]
        if visit:  # the baselines condition on a non-empty visit
            out.append((visit, prev, float(rng.uniform(0, 90)), "MF"[int(rng.integers(2))]))
    return out, prior


def test_sparse_set_nll_equals_the_dense_reference():
    rng = np.random.default_rng(0)
    codes = [f"c{j}" for j in range(12)]
    events, prior = random_pairs(rng, 50, codes, a=0.3)
    index = {c: j for j, c in enumerate(codes)}
    pairs = VisitPairs.from_visits(events, index)
    y = np.array([[c in v for c in codes] for v, *_ in events], dtype=float)
    prev = np.array([[c in pv for c in codes] for _, pv, *_ in events], dtype=float)
    for a in (0.0, 0.4, 0.9):
        dense = bernoulli_set_nll(a * prev + (1 - a) * prior, y)
        assert set_nll(prior, pairs, a) == pytest.approx(dense, rel=1e-9)
    strat = rng.uniform(0.01, 0.3, (N_STRATA, len(codes)))
    rows = strat[[stratum(age, sex) for _, _, age, sex in events]]
    assert set_nll(strat, pairs, 0.2) == pytest.approx(bernoulli_set_nll(0.2 * prev + 0.8 * rows, y), rel=1e-9)


def test_repeat_weight_is_recovered_from_data_it_generated():
    rng = np.random.default_rng(0)
    codes = [f"c{j}" for j in range(30)]
    events, prior = random_pairs(rng, 3000, codes, a=0.6)
    pairs = VisitPairs.from_visits(events, {c: j for j, c in enumerate(codes)})
    assert fit_repeat_weight(prior, pairs) == pytest.approx(0.6, abs=0.04)


def test_baselines_are_fitted_on_training_next_visits_only():
    """A code that only FIRST visits of training patients hold is rare in next visits: the next-visit
    prior must not learn it from first visits, and nothing of the scored patients enters the fit."""
    codes = ["first_only", "next_a", "next_b"]
    train = [Patient(f"p{i}", 50.0, "F", [["first_only"], ["next_a"] if i % 2 else ["next_b"]]) for i in range(40)]
    fitted = NextVisitBaselines.fit(train, codes)
    assert fitted.prior[0] < 0.05 and fitted.prior[1] == pytest.approx(fitted.prior[2])
    first = NextVisitBaselines.fit(train, codes, first=True)
    assert first.prior[0] > 0.9
    # the stratified prior falls back on the overall prior in a stratum without training visits
    assert fitted.stratified[stratum(50.0, "M")] == pytest.approx(fitted.prior)


def test_stratified_prior_follows_the_strata():
    codes = ["pregnancy", "prostate"]
    women = [Patient(f"w{i}", 30.0, "F", [["x"], ["pregnancy"]]) for i in range(50)]
    men = [Patient(f"m{i}", 70.0, "M", [["x"], ["prostate"]]) for i in range(50)]
    pairs = VisitPairs.from_visits(
        [(p.visits[1], p.visits[0], p.age, p.sex) for p in women + men], {c: j for j, c in enumerate(codes)}
    )
    strat = visit_prior(pairs, 2, strength=5.0)
    assert strat[stratum(30.0, "F"), 0] > 0.9 and strat[stratum(30.0, "F"), 1] < 0.1
    assert strat[stratum(70.0, "M"), 1] > 0.9
    scores = NextVisitBaselines.fit(women + men, codes).score(pairs)
    assert scores["stratified"].mean() < scores["frequency"].mean() - 0.5
