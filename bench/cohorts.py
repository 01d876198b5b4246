"""The built-in cohorts' shape, speed and next-visit difficulty (a benchmark that prints figures).

    python bench/cohorts.py                                   # every generator, 25,000 patients, seed 0
    python bench/cohorts.py --generators hmm transition --patients 46520 --scored 5000

Per generator of `promptehr.cohorts.GENERATORS`: distinct codes, the share of code occurrences held by
the 100 most frequent codes, visits per patient, share of patients with 2+ visits, codes per visit, the
wall time to sample the cohort and to compute the exact log-likelihood of every visit of `--scored`
patients (`next_visit_log_probs`). Then, on the next visits (k >= 1) of the last 20% of the patients,
with the first 80% as training patients, the mean NLL per visit of bench/quality.py's estimators
without a model: the next-visit frequency prior, "repeat the previous visit + prior" and the exact optimum.
For the hidden-Markov cohorts (hmm, small) also a learnability reference: the exact model with its code
probabilities re-estimated from the training patients by a learner told every training visit's hidden
state (`known_state_estimate`), and a generic learner that is told nothing but the number of states: a
hidden-Markov model fitted to the training patients by EM from a random start (`em_estimate`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace

import numpy as np

from promptehr.baselines import NextVisitBaselines, VisitPairs
from promptehr.cli import setup_logging
from promptehr.cohorts import GENERATORS, CohortModel, cohort_model
from promptehr.cohorts.base import logsumexp


def shape(patients) -> dict[str, float]:
    counts = Counter(c for p in patients for v in p.visits for c in v)
    n_visits = np.array([len(p.visits) for p in patients])
    codes_per_visit = np.array([len(v) for p in patients for v in p.visits])
    return {
        "distinct codes": len(counts),
        "top-100 share": sum(n for _, n in counts.most_common(100)) / sum(counts.values()),
        "visits per patient": n_visits.mean(),
        "share with 2+ visits": (n_visits >= 2).mean(),
        "codes per visit": codes_per_visit.mean(),
    }


def scored_events(train, heldout) -> list[tuple[int, int]]:
    """(patient, k) of the next visits (k >= 1) of `heldout` that are scored: visits holding a code outside
    the training patients' codes are left out, as in bench/quality.py."""
    known = {c for p in train for v in p.visits for c in v}
    return [(i, k) for i, p in enumerate(heldout) for k in range(1, len(p.visits)) if set(p.visits[k]) <= known]


def model_nll(model, heldout, events) -> float:
    """Mean -log P(visit k | visits < k, age, sex, visit k exists) of `events` under a cohort model."""
    cache: dict[int, np.ndarray] = {}
    return float(np.mean([-cache.setdefault(i, model.next_visit_log_probs(heldout[i]))[k] for i, k in events]))


def gap_closed(nll: dict[str, float], estimate: float) -> float:
    """The share of the gap between the frequency prior and the optimum of `nll` that `estimate` closes."""
    return (nll["frequency"] - estimate) / (nll["frequency"] - nll["optimum"])


def next_visit_nll(model, train, heldout) -> dict[str, float]:
    """Mean NLL per next visit (k >= 1) of `heldout` (`scored_events`): the next-visit frequency prior and
    repeat + prior of `promptehr.baselines` (fitted on the training patients' next visits, as
    bench/quality.py) and the exact optimum."""
    codes = sorted({c for p in train for v in p.visits for c in v})
    events = scored_events(train, heldout)
    baselines = NextVisitBaselines.fit(train, codes)
    index = {c: j for j, c in enumerate(codes)}
    pairs = VisitPairs.from_visits(
        [(heldout[i].visits[k], heldout[i].visits[k - 1], heldout[i].age, heldout[i].sex) for i, k in events], index
    )
    scores = baselines.score(pairs)
    out = {
        "events": len(events),
        "frequency": scores["frequency"].mean(),
        "repeat": scores["repeat"].mean(),
        "repeat weight": baselines.repeat_weight,
        "optimum": model_nll(model, heldout, events),
    }
    out["repeat gap share"] = gap_closed(out, out["repeat"])
    return out


def add_code_counts(model: CohortModel, patient, visit_idx, weights, hits: np.ndarray, seen: np.ndarray) -> None:
    """The code counts of one patient for estimating `code_prob`: visit k adds `weights[k]` (one weight per
    state) to `seen` for every code allowed for the patient's age and sex and not boosted by visit k-1 (a
    chronic code present there persists whatever the state), and to `hits` for those of them it holds."""
    allowed = model.allowed_mask(patient.age, patient.sex)
    chronic = model.persistence > 0
    for k, (idx, w) in enumerate(zip(visit_idx, weights)):
        clean = allowed.copy()
        if k:
            prev = visit_idx[k - 1]
            clean[prev[chronic[prev]]] = 0.0
        seen += w[:, None] * clean[None, :]
        hits[:, idx[clean[idx] > 0]] += w[:, None]


def known_state_estimate(model: CohortModel, train, train_states, shrinkage: float = 8.0) -> CohortModel:
    """`model` with `code_prob` re-estimated from `train` given each visit's hidden state (`train_states`):
    per state and code, (visits holding the code + shrinkage * its overall rate) / (visits + shrinkage),
    counting only visits where the code was allowed (age/sex) and not boosted by the previous visit
    (persistence). Everything else (states, transitions, persistence) stays exact, so this is an
    optimistic reference for what a learner can reach from these patients, not a bound."""
    hits, seen = np.zeros_like(model.code_prob), np.zeros_like(model.code_prob)
    one_hot = np.eye(model.n_states)
    for patient, states in zip(train, train_states):
        add_code_counts(model, patient, [model._visit_indices(v) for v in patient.visits], one_hot[states], hits, seen)
    rate = hits.sum(0) / np.maximum(seen.sum(0), 1.0)
    estimate = (hits + shrinkage * rate[None, :]) / (seen + shrinkage)
    code_prob = np.where(model.code_prob > 0, np.clip(estimate, 1e-9, 0.95), 0.0)  # the exact zeros stay zero
    return replace(model, code_prob=code_prob)


def em_estimate(model: CohortModel, train, n_states: int, iterations: int = 10, seed: int = 0) -> CohortModel:
    """A hidden-Markov model with `n_states` states fitted to `train` by expectation-maximisation (forward-
    backward) from a random start: initial state distribution, transitions, continue probabilities and per-state
    code probabilities are learned; of `model` it keeps only the vocabulary, the age/sex code rules and the
    chronic codes' persistence. No state is age- or sex-specific."""
    S = n_states
    index = [[model._visit_indices(v) for v in p.visits] for p in train]
    counts = np.zeros(model.n_codes)
    for visits in index:
        for idx in visits:
            counts[idx] += 1
    rate = np.clip(counts / sum(len(v) for v in index), 1e-7, 0.9)
    rng = np.random.default_rng(seed)
    fit = replace(
        model,
        state_names=[f"state{i}" for i in range(S)],
        init_logit=np.zeros(S),
        init_logit_age=np.zeros(S),
        init_logit_male=np.zeros(S),
        state_min_age=np.zeros(S),
        state_max_age=np.full(S, np.inf),
        state_sex=[None] * S,
        transition=np.full((S, S), 1.0 / S),
        code_prob=np.clip(rate[None, :] * rng.lognormal(0.0, 1.0, (S, model.n_codes)), 1e-7, 0.9),
        continue_prob=np.full(S, 0.2),
    )
    for _ in range(iterations):
        log_init = fit.init_logit - logsumexp(fit.init_logit)
        log_t = np.log(fit.transition)
        log_more, log_end = np.log(fit.continue_prob), np.log1p(-fit.continue_prob)
        hits, seen = np.zeros_like(fit.code_prob), np.zeros_like(fit.code_prob)
        first, moves, stays, visits_in = np.zeros(S), np.zeros((S, S)), np.zeros(S), np.zeros(S)
        for patient, idx in zip(train, index):
            K = len(idx)
            emit = np.stack(
                [fit._visit_loglik_states(idx[k], idx[k - 1] if k else None, patient.age, patient.sex) for k in range(K)]
            )
            emit = np.where(np.isfinite(emit), emit, -1e9) + np.stack([log_more] * (K - 1) + [log_end])
            fwd, bwd = np.zeros((K, S)), np.zeros((K, S))
            fwd[0] = log_init + emit[0]
            for k in range(1, K):
                fwd[k] = logsumexp(fwd[k - 1][:, None] + log_t, axis=0) + emit[k]
            for k in range(K - 2, -1, -1):
                bwd[k] = logsumexp(log_t + (emit[k + 1] + bwd[k + 1])[None, :], axis=1)
            total = logsumexp(fwd[-1])
            post = np.exp(fwd + bwd - total)
            first += post[0]
            for k in range(K - 1):
                moves += np.exp(fwd[k][:, None] + log_t + (emit[k + 1] + bwd[k + 1])[None, :] - total)
            stays += post[:-1].sum(0)
            visits_in += post.sum(0)
            add_code_counts(model, patient, idx, post, hits, seen)
        transition = moves + 1e-3
        fit = replace(
            fit,
            init_logit=np.log(first / first.sum() + 1e-12),
            transition=transition / transition.sum(1, keepdims=True),
            continue_prob=np.clip(stays / np.maximum(visits_in, 1e-9), 1e-4, 0.99),
            code_prob=np.clip((hits + rate[None, :]) / (seen + 1.0), 1e-9, 0.95),
        )
    return fit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--patients", type=int, default=25_000)
    parser.add_argument("--scored", type=int, default=5_000, help="patients whose exact likelihood is timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--em-iterations", type=int, default=10, help="EM iterations of the generic HMM reference")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    for name in args.generators:
        model = cohort_model(name)
        t = time.perf_counter()
        if isinstance(model, CohortModel):
            patients, states = model.sample_with_states(args.patients, args.seed)
        else:
            patients, states = model.sample(args.patients, args.seed), None
        sample_s = time.perf_counter() - t
        t = time.perf_counter()
        for p in patients[: args.scored]:
            model.next_visit_log_probs(p)
        score_s = time.perf_counter() - t
        print(
            f"\n{name}: {len(model.codes)} codes in the vocabulary; {args.patients} patients (seed {args.seed}) "
            f"sampled in {sample_s:.1f}s; exact likelihood of every visit of {args.scored} patients in {score_s:.1f}s"
        )
        for key, value in shape(patients).items():
            print(f"  {key:<22} {value:.3f}" if isinstance(value, float) else f"  {key:<22} {value}")
        cut = int(0.8 * len(patients))
        nll = next_visit_nll(model, patients[:cut], patients[cut:])
        print(
            f"  next visits of the last 20% ({nll['events']} visits), NLL nats/visit: frequency prior "
            f"{nll['frequency']:.2f}, repeat + prior {nll['repeat']:.2f} (a={nll['repeat weight']:.3f}; closes "
            f"{nll['repeat gap share']:.1%} of the gap), optimum {nll['optimum']:.2f}"
        )
        if states is not None:
            events = scored_events(patients[:cut], patients[cut:])
            learned = model_nll(known_state_estimate(model, patients[:cut], states[:cut]), patients[cut:], events)
            print(
                f"  learnability reference (the exact model, code probabilities re-estimated from the {cut} training "
                f"patients with their hidden states known): {learned:.2f} nats/visit, closes {gap_closed(nll, learned):.1%} "
                "of the gap"
            )
            t = time.perf_counter()
            fitted = em_estimate(model, patients[:cut], model.n_states, args.em_iterations)
            learned = model_nll(fitted, patients[cut:], events)
            print(
                f"  a {model.n_states}-state hidden-Markov model fitted to the training patients by EM from a random start "
                f"({args.em_iterations} iterations, {time.perf_counter() - t:.0f}s): {learned:.2f} nats/visit, closes "
                f"{gap_closed(nll, learned):.1%} of the gap"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
