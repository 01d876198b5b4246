"""The built-in cohorts' shape, speed and next-visit difficulty (a benchmark that prints figures).

    python bench/cohorts.py                                   # every generator, 25,000 patients, seed 0
    python bench/cohorts.py --generators hmm transition --patients 46520 --scored 5000

Per generator of `promptehr.cohorts.GENERATORS`: distinct codes, the share of code occurrences held by
the 100 most frequent codes, visits per patient, share of patients with 2+ visits, codes per visit, the
wall time to sample the cohort and to compute the exact log-likelihood of every visit of `--scored`
patients (`next_visit_log_probs`). Then, on the next visits (k >= 1) of the last 20% of the patients,
with the first 80% as training patients, the mean NLL per visit of bench/quality.py's estimators
without a model: the next-visit frequency prior, "repeat the previous visit + prior" and the exact optimum.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np

from promptehr.baselines import NextVisitBaselines, VisitPairs
from promptehr.cli import setup_logging
from promptehr.cohorts import GENERATORS, cohort_model


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


def next_visit_nll(model, train, heldout) -> dict[str, float]:
    """Mean NLL per next visit (k >= 1) of `heldout`: the next-visit frequency prior and repeat + prior
    of `promptehr.baselines` (fitted on the training patients' next visits, as bench/quality.py) and
    the exact optimum; visits holding a code outside the training vocabulary are left out, as there."""
    codes = sorted({c for p in train for v in p.visits for c in v})
    known = set(codes)
    events = [(i, k) for i, p in enumerate(heldout) for k in range(1, len(p.visits)) if set(p.visits[k]) <= known]
    baselines = NextVisitBaselines.fit(train, codes)
    index = {c: j for j, c in enumerate(codes)}
    pairs = VisitPairs.from_visits(
        [(heldout[i].visits[k], heldout[i].visits[k - 1], heldout[i].age, heldout[i].sex) for i, k in events], index
    )
    scores = baselines.score(pairs)
    frequency, repeat = scores["frequency"], scores["repeat"]
    cache: dict[int, np.ndarray] = {}
    optimum = np.array([-cache.setdefault(i, model.next_visit_log_probs(heldout[i]))[k] for i, k in events])
    return {
        "events": len(events),
        "frequency": frequency.mean(),
        "repeat": repeat.mean(),
        "repeat weight": baselines.repeat_weight,
        "optimum": optimum.mean(),
        "repeat gap share": (frequency.mean() - repeat.mean()) / (frequency.mean() - optimum.mean()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--patients", type=int, default=25_000)
    parser.add_argument("--scored", type=int, default=5_000, help="patients whose exact likelihood is timed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    for name in args.generators:
        model = cohort_model(name)
        t = time.perf_counter()
        patients = model.sample(args.patients, args.seed)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
