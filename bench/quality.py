"""Model quality against the exact optimum of the built-in cohort (a benchmark that prints figures).

    python bench/quality.py                                   # experiments/base.yaml, its own num_epochs
    python bench/quality.py --epochs 10 --minutes 20 --overrides "training.learning_rate=2e-3"
    python bench/quality.py --checkpoint checkpoints/<run>/best_model   # score a trained model only

Trains the config with `promptehr.train.train` (no tracking), loads the best checkpoint, and scores
every next visit k >= 1 of the held-out patients (the split train() used) under:
  (a) the model: NLL of visit k's codes in a uniformly random order plus its closing `</v>`, teacher-
      forced after `<v> v0 </v> .. <v> v(k-1) </v> <v>` with the encoder holding the history and a
      `<v> <mask> </v>` placeholder (the next-visit row of `promptehr.patient_format`), minus log(n!). Averaged over
      random orders this is an upper bound on the model's NLL of the visit's code SET (Jensen:
      E_order[-log P(order)] - log n! >= -log sum_orders P(order)); `--orders M` also prints the
      tighter bound -log(mean of the M order probabilities) - log n!. A model of an ordered vocabulary
      (`model.visit_order: frequency`) admits one order per code set: its NLL of the visit's codes in id
      order plus `</v>` is the exact set NLL (one order, nothing subtracted).
  (b) the exact cohort model (the Bayes optimum): log P(visit k | visits < k, age, sex, visit k exists)
      by the forward algorithm. Both (a) and (b) condition on visit k existing: (a) does not score the
      `<v>` that opens visit k, nor anything after its `</v>`.
  (c) baselines (`promptehr.baselines`, fitted on the training patients' NEXT visits), Bernoulli per
      code conditioned on a non-empty visit like the cohort: the next-visit frequency prior q_c, its
      age/sex-stratified version, and repeat p_c = a * [c in visit k-1] + (1 - a) * q_c with `a`
      fitted by maximum likelihood on the training next visits.
Prints mean NLL (nats per visit) +- standard error, ratios to the optimum, model minus optimum and
the share of the gap between the next-visit prior and the optimum the model closes (patient-bootstrap
95% intervals), on the held-out split and on `--fresh-patients` (5,000) new cohort patients: the
configs were chosen on the held-out split, so the fresh-patient headline is the figure that counts.
Visits holding a code outside the training vocabulary are left out of every estimator (counted). A
history longer than the model's rows (`collator.max_length` tokens) loses its earliest visits for (a),
as `EHRPatientDataset` trims a training patient (counted); (b) and (c) keep it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptehr.baselines import NextVisitBaselines, VisitPairs
from promptehr.checkpoint import load_checkpoint
from promptehr.cli import add_config_arguments, overrides_of, setup_logging
from promptehr.cohorts import CohortModel, TransitionModel, cohort_model_for
from promptehr.collator import TASK_ID
from promptehr.config import load_config
from promptehr.data import load_patients, split_patients
from promptehr.patient_format import (
    arrange_visits,
    first_fitting_visit,
    hidden_visit_row,
    pad_batch,
    with_closing_token,
)
from promptehr.schema import SEXES
from promptehr.tokenizer import DiagnosisCodeTokenizer

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.quality")


# ------------------------------------------------------------------ events: (patient, k) pairs


def next_visit_events(patients, tokenizer: DiagnosisCodeTokenizer, first: bool = False) -> tuple[list[tuple[int, int]], int]:
    """(patient index, k) for every visit k >= 1 (or, with `first`, every first visit k = 0) whose
    codes are all in the vocabulary; and the number of visits left out for holding an unknown code."""
    events, skipped = [], 0
    for i, p in enumerate(patients):
        for k in range(1) if first else range(1, len(p.visits)):
            if all(c in tokenizer.token_to_id and tokenizer.token_to_id[c] >= tokenizer.n_special for c in p.visits[k]):
                events.append((i, k))
            else:
                skipped += 1
    return events, skipped


# ------------------------------------------------------------------ (a) the trained model


def scored_batch(tok, rows) -> tuple[dict, torch.Tensor]:
    """Rows (encoder ids, label ids, first code position, age, sex) of `patient_format.hidden_visit_row`,
    padded; and the scored label positions: visit k's codes and its `</v>` (not the `<v>` that opens
    it, nor the token after)."""
    batch = pad_batch(
        tok,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [TASK_ID["next_visit_prediction"]] * len(rows),
        [r[3] for r in rows],
        [r[4] for r in rows],
    )
    return batch, with_closing_token(batch["target_mask"])


def history_start(visits, k: int, max_length: int) -> int:
    """The first visit of the history the model can hold in the row hiding visit k: the earliest visits
    go, as `EHRPatientDataset` trims a patient, until `<s>`, visits start..k and `</s>` fit `max_length`
    tokens (0 when the whole history fits)."""
    if len(visits[k]) + 4 > max_length:  # <s> <v> codes </v> </s>
        raise ValueError(f"a visit of {len(visits[k])} codes does not fit a row of collator.max_length={max_length} tokens")
    return first_fitting_visit(visits[: k + 1], max_length)


@torch.no_grad()
def model_visit_nll(
    model,
    tok,
    patients,
    events,
    orders: int = 4,
    seed: int = 0,
    batch_size: int = 128,
    device="cpu",
    max_length: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Per event: (mean over `orders` random code orders of the sequence NLL minus log n!,
    -log(mean of the order probabilities) - log n!). Histories are shuffled too (teacher-forced) and
    hold the latest visits that fit `max_length` (`history_start`). An ordered vocabulary: both are the
    exact set NLL of the visit written in id order."""
    rng = np.random.default_rng(seed)
    orders = 1 if tok.ordered else orders
    rows = []  # (encoder ids, label ids, first code position, age, sex id), `orders` per event
    for i, k in events:
        p = patients[i]
        ids = [np.array([tok.token_to_id.get(c, tok.unk_token_id) for c in v], dtype=np.int64) for v in p.visits]
        start = history_start(ids, k, max_length)
        for _ in range(orders):
            visits = arrange_visits(tok, ids[start : k + 1], rng) + ids[k + 1 :]  # later visits: only their count matters
            rows.append((*hidden_visit_row(tok, visits, k - start), p.age, SEXES.index(p.sex)))
    nll = np.zeros(len(rows))
    for s in range(0, len(rows), batch_size):
        batch, scored = scored_batch(tok, rows[s : s + batch_size])
        out = model(**{key: v.to(device) for key, v in batch.items()})
        logp = F.log_softmax(out["logits"].float(), dim=-1).cpu()
        token_nll = -logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll[s : s + len(scored)] = (token_nll * scored).sum(1).numpy()
    log_fact = np.array([0.0 if tok.ordered else math.lgamma(len(patients[i].visits[k]) + 1) for i, k in events])
    return order_bounds(nll.reshape(len(events), orders), log_fact)


def order_bounds(per_order: np.ndarray, log_fact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From (events, orders) sequence NLLs: the mean over orders minus log n! (the upper bound), and
    -log(mean over orders of the order probabilities) - log n! (tighter; still a bound: the mean,
    never the best order, since a visit's orders are equally likely)."""
    m = per_order.min(1, keepdims=True)  # -log mean exp(-nll), stably
    log_mean = (m[:, 0] - np.log(np.exp(-(per_order - m)).mean(1))) - log_fact
    return per_order.mean(1) - log_fact, log_mean


# ------------------------------------------------------------------ (b) the exact optimum


def optimum_visit_nll(cohort_model, patients, events) -> np.ndarray:
    """-log P(visit k | visits < k, age, sex, visit k exists) under the generating model."""
    cache: dict[int, np.ndarray] = {}
    out = np.zeros(len(events))
    for e, (i, k) in enumerate(events):
        if i not in cache:
            cache[i] = cohort_model.next_visit_log_probs(patients[i])
        out[e] = -cache[i][k]
    if not np.all(np.isfinite(out)):
        raise ValueError("the cohort model gives probability 0 to a held-out visit: is the data the built-in cohort?")
    return out


# ------------------------------------------------------------------ (c) baselines and summary


def mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def gap_share(freq, model, optimum) -> float:
    return float((freq.mean() - model.mean()) / (freq.mean() - optimum.mean()))


def bootstrap(groups, columns, statistic, n_boot=2000, seed=0) -> tuple[float, float]:
    """95% interval of `statistic(means of columns)`, resampling patients (their visits together)."""
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(ids), len(columns)))
    np.add.at(sums, inverse, np.stack(columns, 1))
    counts = np.bincount(inverse).astype(float)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        values.append(statistic(*(sums[pick].sum(0) / counts[pick].sum())))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def score(
    model, tokenizer, train_patients, eval_patients, orders, seed, device="cpu", first=False, *, cohort, max_length
) -> dict:
    """All estimators on the next visits of `eval_patients` (with `first`: on their first visits, the
    baselines then fitted on training first visits, where "repeat" equals the prior); per-event arrays.
    `cohort`: the generator of the data, whose exact next-visit likelihood is the optimum; `max_length`:
    the model's row length (`collator.max_length`), which bounds the history it is scored with."""
    events, skipped = next_visit_events(eval_patients, tokenizer, first)
    if not events:
        raise ValueError("no held-out patient has 2+ visits")
    model_nll, model_tight = model_visit_nll(
        model, tokenizer, eval_patients, events, orders, seed, device=device, max_length=max_length
    )
    trimmed = sum(history_start(eval_patients[i].visits, k, max_length) > 0 for i, k in events)
    index = {c: j for j, c in enumerate(tokenizer.codes)}
    fitted = NextVisitBaselines.fit(train_patients, tokenizer.codes, first=first)
    pairs = VisitPairs.from_visits(
        [
            (
                eval_patients[i].visits[k],
                eval_patients[i].visits[k - 1] if k else [],
                eval_patients[i].age,
                eval_patients[i].sex,
            )
            for i, k in events
        ],
        index,
    )
    b = fitted.score(pairs)
    return {
        "events": events,
        "skipped": skipped,
        "trimmed": trimmed,
        "repeat_weight": fitted.repeat_weight,
        "model": model_nll,
        "model_tight": model_tight,
        "ordered": tokenizer.ordered,
        "optimum": optimum_visit_nll(cohort, eval_patients, events),
        "frequency": b["frequency"],
        "stratified": b["stratified"],
        "repeat": b["repeat"],
        "n_codes": np.array([len(eval_patients[i].visits[k]) for i, k in events]),
    }


def report(title: str, s: dict, orders: int) -> dict:
    """Print the estimators; return the headline figures."""
    opt = s["optimum"].mean()
    n_pat = len({i for i, _ in s["events"]})
    groups = [i for i, _ in s["events"]]
    print(
        f"\n{title}: {len(s['events'])} visits of {n_pat} patients, "
        f"{s['n_codes'].mean():.2f} codes per visit; {s['skipped']} visits with an unknown code left out"
        + (
            f"; {s['trimmed']} scored with only the latest visits of a history longer than the model's rows"
            if s["trimmed"]
            else ""
        )
    )
    print(f"{'estimator':<52} {'NLL nats/visit':>16} {'/ optimum':>10}")
    if s["ordered"]:
        models = [("model, exact set NLL (codes in id order)", s["model"])]
    else:
        models = [
            (f"model, random order, mean of {orders} orders", s["model"]),
            (f"model, -log mean P over {orders} orders (tighter)", s["model_tight"]),
        ]
    rows = [
        *models,
        ("exact cohort model (Bayes optimum)", s["optimum"]),
        ("next-visit frequency prior (Bernoulli, non-empty)", s["frequency"]),
        ("age/sex-stratified next-visit prior", s["stratified"]),
        (f"repeat previous + prior (a={s['repeat_weight']:.3f})", s["repeat"]),
    ]
    for name, x in rows:
        m, se = mean_se(x)
        print(f"{name:<52} {m:>9.3f} +- {se:<5.3f} {m / opt:>9.3f}")
    diff = s["model"] - s["optimum"]
    diff_lo, diff_hi = bootstrap(groups, [diff], lambda d: d)
    share = gap_share(s["frequency"], s["model"], s["optimum"])
    lo, hi = bootstrap(groups, [s["frequency"], s["model"], s["optimum"]], lambda f, m, o: (f - m) / (f - o))
    print(
        f"HEADLINE model - optimum: {diff.mean():.3f} nats/visit (95% CI {diff_lo:.3f} .. {diff_hi:.3f}; "
        f"{diff.mean() / s['n_codes'].mean():.3f} per code)"
    )
    print(
        f"gap closed against the next-visit prior, (prior - model) / (prior - optimum): {share:.1%} "
        f"(95% CI {lo:.1%} .. {hi:.1%})"
    )
    print(
        f"  with the tighter model bound: {gap_share(s['frequency'], s['model_tight'], s['optimum']):.1%};"
        f"  stratified prior: {gap_share(s['frequency'], s['stratified'], s['optimum']):.1%};"
        f"  repeat baseline: {gap_share(s['frequency'], s['repeat'], s['optimum']):.1%}"
    )
    return {
        "model_minus_optimum": float(diff.mean()),
        "ci": (diff_lo, diff_hi),
        "gap_share": share,
        "gap_share_ci": (lo, hi),
        "visits": len(s["events"]),
    }


# ------------------------------------------------------------------ diagnosis: the first code of a next visit


@torch.no_grad()
def first_code_persistence(
    model,
    tok,
    cohort_model,
    patients,
    events,
    samples: int = 400,
    seed: int = 0,
    batch_size: int = 64,
    max_length: int = 512,
) -> dict[str, float]:
    """What the model and the optimum predict for the FIRST code of next visit k (random order).

    The optimum's first-code distribution is P(first = c) = E[1{c in V} / |V|] over visits V of the
    exact posterior (state from the forward algorithm, codes from `code_probs` with the previous
    visit's persistence, empty visits redrawn), estimated with `samples` draws per event. Returns the
    mean mass each puts on the previous visit's chronic codes (persistence > 0), on its acute codes,
    and the mean KL(optimum || model) of the first-code distribution in nats."""
    rng = np.random.default_rng(seed)
    index = {c: j for j, c in enumerate(cohort_model.codes)}
    token_of_code = torch.tensor([tok.token_to_id.get(c, tok.unk_token_id) for c in cohort_model.codes])
    rows = []
    for i, k in events:
        p = patients[i]
        ids = [np.array([tok.token_to_id.get(c, tok.unk_token_id) for c in v], dtype=np.int64) for v in p.visits]
        start = history_start(ids, k, max_length)
        rows.append((*hidden_visit_row(tok, ids[start:], k - start), p.age, SEXES.index(p.sex)))
    out = {"model_chronic": [], "optimum_chronic": [], "model_acute": [], "optimum_acute": [], "kl": []}
    for s in range(0, len(rows), batch_size):
        batch, _ = scored_batch(tok, rows[s : s + batch_size])
        logp = F.log_softmax(model(**batch)["logits"].float(), dim=-1)
        for j, row in enumerate(rows[s : s + batch_size]):
            i, k = events[s + j]
            p = patients[i]
            model_p = logp[j, row[2]].exp()[token_of_code].numpy()  # over the cohort's codes
            states = rng.choice(cohort_model.n_states, size=samples, p=cohort_model.next_visit_state_probs(p, k))
            optimum = np.zeros(cohort_model.n_codes)
            drawn = 0
            for z in states:
                visit = rng.random(cohort_model.n_codes) < cohort_model.code_probs(int(z), p.age, p.sex, p.visits[k - 1])
                if visit.any():
                    optimum += visit / visit.sum()
                    drawn += 1
            optimum /= max(drawn, 1)
            prev = np.array(sorted({index[c] for c in p.visits[k - 1]}), dtype=np.int64)
            chronic = cohort_model.persistence[prev] > 0
            out["model_chronic"].append(model_p[prev[chronic]].sum())
            out["optimum_chronic"].append(optimum[prev[chronic]].sum())
            out["model_acute"].append(model_p[prev[~chronic]].sum())
            out["optimum_acute"].append(optimum[prev[~chronic]].sum())
            nz = optimum > 0
            out["kl"].append(float(optimum[nz] @ (np.log(optimum[nz]) - np.log(np.maximum(model_p[nz], 1e-12)))))
    return {key: float(np.mean(v)) for key, v in out.items()}


def bernoulli_token_logps(p: np.ndarray, targets) -> np.ndarray:
    """Log-probabilities of the tokens of a code set written in id order (codes, then `</v>`) under
    independent Bernoulli(p) per code position conditioned on a non-empty set: after code c' the next
    token is c > c' with P = p_c prod_{c'<d<c} (1 - p_d), `</v>` with prod_{d>c'} (1 - p_d); the first
    token is divided by P(non-empty). They sum to the set's log-probability."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    skip = np.concatenate([[0.0], np.cumsum(np.log1p(-p))])  # skip[j]: log prod_{d<j} (1 - p_d)
    out, last = [], -1
    for t in sorted(targets):
        out.append(math.log(p[t]) + skip[t] - skip[last + 1])
        last = t
    out.append(skip[-1] - skip[last + 1])
    out[0] -= math.log(-math.expm1(skip[-1]))
    return np.array(out)


TOKEN_KINDS = ("previous-visit codes", "new codes", "</v>")


@torch.no_grad()
def nats_by_token_kind(model, tok, patients, events, references, batch_size=64, max_length=512) -> dict:
    """Where the nats of next visits go, for an ordered vocabulary: the model's token NLL summed per
    visit over the codes that were in the previous visit, the other codes, and the closing `</v>`; and
    the same split of each Bernoulli reference (`references`: name -> function (patient, k) -> (C,)
    probability per vocabulary code, in vocabulary order, then any codes the vocabulary lacks;
    `bernoulli_token_logps`). Returns name -> (2, 3) array: tokens
    per visit and nats per visit, per kind; "model" included."""
    rows, kinds = [], []
    for i, k in events:
        p = patients[i]
        ids = [np.sort([tok.token_to_id.get(c, tok.unk_token_id) for c in v]).astype(np.int64) for v in p.visits]
        start = history_start(ids, k, max_length)
        rows.append((*hidden_visit_row(tok, ids[start:], k - start), p.age, SEXES.index(p.sex)))
        previous = set(ids[k - 1].tolist())
        kinds.append([0 if c in previous else 1 for c in ids[k].tolist()] + [2])
    totals = {"model": np.zeros((2, 3))} | {name: np.zeros((2, 3)) for name in references}
    for s in range(0, len(rows), batch_size):
        batch, scored = scored_batch(tok, rows[s : s + batch_size])
        logp = F.log_softmax(model(**batch)["logits"].float(), dim=-1)
        nll = -logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for j in range(len(scored)):
            i, k = events[s + j]
            kind = np.array(kinds[s + j])
            positions = torch.nonzero(scored[j]).flatten()
            np.add.at(totals["model"][1], kind, nll[j, positions].numpy())
            np.add.at(totals["model"][0], kind, 1)
            targets = [c - tok.n_special for c in batch["labels"][j, positions[:-1]].tolist()]
            for name, probs in references.items():
                np.add.at(totals[name][1], kind, -bernoulli_token_logps(probs(patients[i], k), targets))
                np.add.at(totals[name][0], kind, 1)
    return {name: t / len(events) for name, t in totals.items()}


# ------------------------------------------------------------------ main


def print_token_kinds(model, tok, cohort, train_patients, patients, events, max_length) -> None:
    """`nats_by_token_kind` of held-out next visits against the repeat baseline and, for a cohort whose
    next visit is one Bernoulli set given the previous visit (`transition`), the exact optimum."""
    fitted = NextVisitBaselines.fit(train_patients, tok.codes)
    position = {c: j for j, c in enumerate(tok.codes)}

    def repeat(p, k):
        previous = np.zeros(len(tok.codes))
        previous[[position[c] for c in p.visits[k - 1] if c in position]] = 1.0
        return fitted.repeat_weight * previous + (1 - fitted.repeat_weight) * fitted.prior

    references = {"repeat": repeat}
    if isinstance(cohort, TransitionModel):
        index = {c: j for j, c in enumerate(cohort.codes)}
        take = np.array([index[c] for c in tok.codes])  # every vocabulary code is a cohort code
        # codes the vocabulary lacks go after its last code: never in a scored visit, but their absence
        # is part of every `</v>` and of the non-empty conditioning, as in the exact likelihood
        order = np.concatenate([take, np.setdiff1d(np.arange(len(cohort.codes)), take)])
        references["optimum"] = lambda p, k: cohort.code_probs(p.age, p.sex, p.visits[k - 1])[order]
    split = nats_by_token_kind(model, tok, patients, events, references, max_length=max_length)
    print(f"\nwhere the nats of {len(events)} held-out next visits go, codes in id order (tokens, nats per visit):")
    print("  " + " " * 9 + "".join(f"{kind:>26s}" for kind in TOKEN_KINDS))
    for name, t in split.items():
        print(f"  {name:9s}" + "".join(f"{t[0, j]:13.2f}{t[1, j]:13.2f}" for j in range(3)) + f"   total {t[1].sum():.2f}")


def train_and_load(cfg, minutes: float | None):
    from promptehr.tracking import Tracker
    from promptehr.train import TrainingPruned, train

    start = time.perf_counter()
    curve = []

    def stop_at_budget(epoch, metrics):
        curve.append(f"{epoch + 1}:{metrics.get('next_visit_nll', float('nan')):.2f}")
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            raise TrainingPruned(f"time budget of {minutes} min reached after epoch {epoch + 1}")

    try:
        result = train(cfg, Tracker(), on_validate=stop_at_budget)
    except TrainingPruned as exc:
        logger.warning("%s: scoring the best checkpoint so far", exc)
        result = exc.result
    wall = time.perf_counter() - start
    logger.info("validation next-visit NLL by epoch: %s", " ".join(curve))
    if not result["best_checkpoint"]:
        raise FileNotFoundError(f"the run in {result['checkpoint_dir']} saved no best_model")
    return Path(result["best_checkpoint"]), wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, str(ROOT / "experiments" / "base.yaml"), epochs=True)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop at the first validation after this many minutes (the schedule stays the config's)",
    )
    parser.add_argument("--checkpoint", default=None, help="score this checkpoint folder instead of training")
    parser.add_argument("--orders", type=int, default=4, help="random code orders per visit")
    parser.add_argument(
        "--fresh-patients",
        type=int,
        default=5000,
        help="also score N new patients drawn from the cohort model: the figure that counts, since "
        "configs are chosen on the held-out split (default 5000; 0: off)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also score first visits (k = 0) and training patients' next visits (in-sample)",
    )
    parser.add_argument("--keep", default=None, help="keep the checkpoints in this folder (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    for noisy in ("promptehr.train", "promptehr.data", "promptehr.schema"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    overrides = ["training.quality_report=false", *overrides_of(args)]  # train()'s cohort report: not needed here
    tmp = None
    wall = None  # scoring a trained checkpoint
    if args.checkpoint:
        folder = Path(args.checkpoint)
    else:
        if args.keep is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-quality-")
        cfg = load_config(args.config, [*overrides, f"training.checkpoint_dir={args.keep or tmp.name}"])
        if cfg.data.source != "synthetic":
            parser.error("the exact optimum exists only for the built-in cohort (data.source=synthetic)")
        logger.info("training %s %s", args.config, " ".join(overrides))
        folder, wall = train_and_load(cfg, args.minutes)
    model, tokenizer, cfg, meta = load_checkpoint(folder)
    torch.set_grad_enabled(False)

    patients, _, _ = load_patients(cfg.data)
    train_patients, val_patients = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    t = time.perf_counter()
    cohort = cohort_model_for(cfg.data)  # the generator of data.synthetic.generator: the exact optimum
    scored = functools.partial(
        score,
        model,
        tokenizer,
        train_patients,
        orders=args.orders,
        seed=args.seed,
        cohort=cohort,
        max_length=cfg.collator.max_length,
    )  # the estimators on the next visits (or first visits) of a set of patients
    s = scored(val_patients)
    m = meta.get("metrics", {})
    print(f"\nconfig {args.checkpoint or args.config} {' '.join(overrides)}")
    print(
        (f"training wall time {wall / 60:.1f} min; " if wall is not None else "a trained checkpoint; ")
        + f"best checkpoint epoch {meta.get('epoch', -1) + 1}, "
        f"step {meta.get('global_step')}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )
    get = lambda key: m.get(key, float("nan"))  # noqa: E731
    print(
        f"validation (held-out {cfg.data.val_fraction:.0%}, protocol {meta.get('protocol_id')}): next-visit NLL "
        f"{get('next_visit_nll'):.3f} (frequency {get('next_visit_nll_frequency'):.3f}, repeat "
        f"{get('next_visit_nll_repeat'):.3f}), TPL {get('tpl'):.2f} (frequency {get('tpl_frequency_baseline'):.2f}, "
        f"repeat {get('tpl_repeat_baseline'):.2f}), perplexity of unseen codes {get('perplexity'):.2f}, "
        f"reconstruction rows {get('perplexity_reconstruction'):.2f}, loss {get('loss'):.4f}"
    )
    report("held-out patients of the training split, next visits k >= 1", s, args.orders)
    if args.diagnose:
        report(
            "held-out patients, FIRST visits k = 0 given demographics (repeat = prior)",
            scored(val_patients, first=True),
            args.orders,
        )
        report(
            "TRAINING patients (in-sample), next visits k >= 1",
            scored(train_patients),
            args.orders,
        )
        events, _ = next_visit_events(val_patients, tokenizer)
        events = events[:300]
        if tokenizer.ordered:
            print_token_kinds(model, tokenizer, cohort, train_patients, val_patients, events, cfg.collator.max_length)
        elif not isinstance(cohort, CohortModel):
            print(
                f"\nfirst code of held-out next visits: not available for data.synthetic.generator="
                f"{cfg.data.synthetic.generator} (it needs the hidden states of an HMM cohort: hmm or small)"
            )
        else:
            d = first_code_persistence(
                model, tokenizer, cohort, val_patients, events, seed=args.seed, max_length=cfg.collator.max_length
            )
            print(
                f"\nfirst code of {len(events)} held-out next visits (random order), model vs optimum (400 posterior "
                f"draws each):\n  mass on the previous visit's chronic codes {d['model_chronic']:.3f} vs "
                f"{d['optimum_chronic']:.3f}; on its acute codes {d['model_acute']:.3f} vs {d['optimum_acute']:.3f}; "
                f"KL(optimum || model) {d['kl']:.3f} nats"
            )
    if args.fresh_patients:
        fresh = cohort.sample(args.fresh_patients, seed=cfg.data.synthetic.seed + 10_007)
        h = report(
            f"{args.fresh_patients} FRESH patients from the cohort model, next visits k >= 1 (the figure "
            "that counts: the config was not chosen on them)",
            scored(fresh),
            args.orders,
        )
        print(
            f"\nheadline (fresh patients): model - optimum {h['model_minus_optimum']:.3f} nats/visit "
            f"(95% CI {h['ci'][0]:.3f} .. {h['ci'][1]:.3f}), gap closed against the next-visit prior "
            f"{h['gap_share']:.1%} ({h['gap_share_ci'][0]:.1%} .. {h['gap_share_ci'][1]:.1%}), {h['visits']} visits"
        )
    print(f"\nscoring took {time.perf_counter() - t:.1f}s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
