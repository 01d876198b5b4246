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
For the code-to-code cohort (transition) the reference keeps the generator's noisy-OR with its true
sparsity pattern and age bands and re-estimates the values of T and of the background from the training
patients' next visits by EM from uninformed values (`noisy_or_em_estimate`): once by maximum likelihood,
once shrunk toward pooled rates as the known-state estimate is.
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
from promptehr.cohorts import GENERATORS, CohortModel, TransitionModel, cohort_model
from promptehr.cohorts.base import N_DEMOGRAPHIC_KEYS, demographic_keys, logsumexp


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
        add_code_counts(model, patient, [model.visit_indices(v) for v in patient.visits], one_hot[states], hits, seen)
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
    index = [[model.visit_indices(v) for v in p.visits] for p in train]
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


def noisy_or_em_estimate(
    model: TransitionModel, train, iterations: int = 20, shrinkage: float = 0.0, start: TransitionModel | None = None
) -> tuple[TransitionModel, list[float]]:
    """`model` (the `transition` cohort) with its later-visit parameters, the non-zero entries of T and the
    per-age-band background b, re-estimated from the next visits (k >= 1) of `train` by expectation-
    maximisation of the noisy-OR: the sparsity pattern of T, the age bands and the age/sex code rules stay
    the generator's, the values of T and b are learned. From `start`'s values, by default uninformed ones:
    every stored T entry 0.1, b = the share of the band's training next visits holding the code.
    E-step: the causes of code c in visit k are the background and each j of visit k-1 with a stored
    T[j, c]; if c is present, cause i was active with probability q_i / P(c present) (q = b_c or T[j, c]),
    if c is absent none was. M-step: T[j, c] = (expected activations of j -> c + shrinkage * the rate of
    all entries) / (next visits after a visit holding j + shrinkage), b_c of a band likewise over that
    band's next visits, shrunk toward the code's rate over all bands (shrinkage 0: maximum likelihood, and
    an entry without data keeps its value). Codes forbidden for the age/sex are left out. The fit ignores
    that a visit is redrawn until non-empty (P(empty) is negligible at about ten expected codes per next
    visit); scoring does not. Values are kept in [1e-6, 0.999]; the visit count (continue logits) is not
    fitted. Returns the fitted model and the exact mean log-likelihood per training next visit before each
    iteration and after the last."""
    C, B = model.n_codes, model.background.shape[0]
    indptr, indices, _ = model.transition
    prev, cur, ages, female = [], [], [], []
    for p in train:
        idx = [np.array(sorted({model.code_index(c) for c in v}), dtype=np.int64) for v in p.visits]
        prev += idx[:-1]
        cur += idx[1:]
        ages += [p.age] * (len(idx) - 1)
        female += [p.sex == "F"] * (len(idx) - 1)
    if not cur:
        raise ValueError("no training patient has a next visit")
    N = len(cur)
    ages, female = np.array(ages, dtype=np.float64), np.array(female, dtype=bool)
    band = np.searchsorted(model.age_band_edges, ages, side="right")
    key = demographic_keys(ages, female)
    masks = np.zeros((N_DEMOGRAPHIC_KEYS, C), dtype=bool)  # the age/sex code rules, per demographic key
    for g in np.unique(key):
        i = int(np.flatnonzero(key == g)[0])
        masks[g] = model.allowed_mask(ages[i], "F" if female[i] else "M") > 0
    per_band_key = np.zeros((B, N_DEMOGRAPHIC_KEYS))
    np.add.at(per_band_key, (band, key), 1.0)
    band_visits = per_band_key @ masks  # (B, C) next visits of the band where the code is allowed
    # (transition, stored entry of T) pairs: the entries of the rows of the previous visit's codes, allowed targets
    src = np.concatenate(prev)
    src_n = np.repeat(np.arange(N), [a.size for a in prev])
    counts = indptr[src + 1] - indptr[src]
    pair_n = np.repeat(src_n, counts)
    pair_e = np.repeat(indptr[src] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    keep = masks[key[pair_n], indices[pair_e]]
    pair_n, pair_e = pair_n[keep], pair_e[keep]
    entry_visits = np.bincount(pair_e, minlength=indices.size)  # next visits after a visit holding the entry's row
    # the codes present in each next visit, and which pairs point at one of them
    pres_n = np.repeat(np.arange(N), [a.size for a in cur])
    pres_c = np.concatenate(cur)
    present = pres_n * C + pres_c  # sorted
    pos = np.minimum(np.searchsorted(present, pair_n * C + indices[pair_e]), present.size - 1)
    hit = present[pos] == pair_n * C + indices[pair_e]
    hit_pres, hit_e = pos[hit], pair_e[hit]
    pres_bc = band[pres_n] * C + pres_c

    if start is None:
        freq = np.bincount(pres_bc, minlength=B * C).reshape(B, C) / np.maximum(band_visits, 1.0)
        t, bg = np.full(indices.size, 0.1), np.clip(freq, 1e-6, 0.999)
    else:
        t, bg = start.transition[2].copy(), start.background.copy()

    def log_likelihood(t, bg):
        """Exact mean log P(next visit | previous visit, age, sex, non-empty) of the training next visits."""
        log1m_bg = np.log1p(-bg)
        total = (log1m_bg @ masks.T)[band, key] + np.bincount(pair_n, weights=np.log1p(-t[pair_e]), minlength=N)
        log1m = log1m_bg.reshape(-1)[pres_bc] + np.bincount(hit_pres, weights=np.log1p(-t[hit_e]), minlength=pres_c.size)
        ll = total + np.bincount(pres_n, weights=np.log(-np.expm1(log1m)) - log1m, minlength=N)
        return float(np.mean(ll - np.log(-np.expm1(total)))), log1m

    trace = []
    for _ in range(iterations):
        ll, log1m = log_likelihood(t, bg)
        trace.append(ll)
        p_present = -np.expm1(log1m)  # P(c present | its causes) of each present code
        active_t = np.bincount(hit_e, weights=t[hit_e] / p_present[hit_pres], minlength=t.size)
        active_bg = np.bincount(pres_bc, weights=bg.reshape(-1)[pres_bc] / p_present, minlength=B * C).reshape(B, C)
        if shrinkage > 0:
            t_rate = active_t.sum() / entry_visits.sum()
            bg_rate = active_bg.sum(0) / np.maximum(band_visits.sum(0), 1.0)
            t = (active_t + shrinkage * t_rate) / (entry_visits + shrinkage)
            bg = (active_bg + shrinkage * bg_rate) / (band_visits + shrinkage)
        else:
            t = np.where(entry_visits > 0, active_t / np.maximum(entry_visits, 1), t)
            bg = np.where(band_visits > 0, active_bg / np.maximum(band_visits, 1.0), bg)
        t, bg = np.clip(t, 1e-6, 0.999), np.clip(bg, 1e-6, 0.999)
    trace.append(log_likelihood(t, bg)[0])
    return replace(model, transition=(indptr, indices, t), background=bg), trace


def with_observed_support(model: TransitionModel, train, min_count: int = 1) -> TransitionModel:
    """`model` with the support of T replaced by what the training patients show: every (j, c) with code
    j in a visit and c in the visit after it, in at least `min_count` next visits (values 0.1). With
    `noisy_or_em_estimate` a generic learner of the noisy-OR form, told nothing of which codes follow
    which."""
    seen: dict[tuple[int, int], int] = {}
    for p in train:
        idx = [sorted({model.code_index(c) for c in v}) for v in p.visits]
        for before, after in zip(idx[:-1], idx[1:]):
            for j in before:
                for c in after:
                    seen[(j, c)] = seen.get((j, c), 0) + 1
    keys = sorted(k for k, n in seen.items() if n >= min_count)
    rows = np.array([j for j, _ in keys], dtype=np.int64)
    cols = np.array([c for _, c in keys], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=model.n_codes))]).astype(np.int64)
    return replace(model, transition=(indptr, cols, np.full(cols.size, 0.1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--patients", type=int, default=25_000)
    parser.add_argument("--scored", type=int, default=5_000, help="patients whose exact likelihood is timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--em-iterations", type=int, default=10, help="EM iterations of the generic HMM reference")
    parser.add_argument(
        "--noisy-or-iterations", type=int, default=20, help="EM iterations of the transition cohort's noisy-OR reference"
    )
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
        events = scored_events(patients[:cut], patients[cut:])
        if states is not None:
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
        if isinstance(model, TransitionModel):
            train = patients[:cut]
            truth = noisy_or_em_estimate(model, train, 0, start=model)[1][0]
            print(
                f"  learnability reference (the generator's noisy-OR with its true sparsity pattern, T and the background "
                f"re-estimated from the {sum(len(p.visits) - 1 for p in train)} next visits of the {cut} training patients "
                f"by EM from T = 0.1 and the band frequencies, {args.noisy_or_iterations} iterations; training "
                f"log-likelihood under the generator's own values: {truth:.2f} nats/visit):"
            )
            for shrinkage, how in ((0.0, "maximum likelihood"), (8.0, "shrunk by 8 pseudo next visits toward pooled rates")):
                t = time.perf_counter()
                fitted, trace = noisy_or_em_estimate(model, train, args.noisy_or_iterations, shrinkage)
                seconds = time.perf_counter() - t
                learned = model_nll(fitted, patients[cut:], events)
                shown = sorted({i for i in (0, 1, 2, 5, 10, 20, 50) if i < len(trace)} | {len(trace) - 1})
                moves = ", ".join(f"{trace[i]:.2f} ({i})" for i in shown)
                print(
                    f"    {how} ({seconds:.1f}s; training log-likelihood (after n iterations): {moves}): "
                    f"{learned:.2f} nats/visit, closes {gap_closed(nll, learned):.1%} of the gap"
                )
            observed = with_observed_support(model, train)
            for shrinkage in (8.0, 32.0, 128.0):
                t = time.perf_counter()
                fitted, _ = noisy_or_em_estimate(observed, train, args.noisy_or_iterations, shrinkage)
                learned = model_nll(fitted, patients[cut:], events)
                print(
                    f"  generic learner: the same noisy-OR on the support the training patients show ("
                    f"{observed.transition[1].size} pairs (j, c) of codes in consecutive visits, the generator's "
                    f"{model.transition[1].size}), shrunk by {shrinkage:.0f} ({time.perf_counter() - t:.0f}s): "
                    f"{learned:.2f} nats/visit, closes {gap_closed(nll, learned):.1%} of the gap"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
