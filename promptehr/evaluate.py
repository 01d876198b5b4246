"""Quality report: a generated cohort against held-out real patients (PROMPTEHR.md section 4).

Inputs: a trained model, its tokenizer, the training and the held-out patients. The generated cohort
gets the held-out patients' own demographics, so the distributions are comparable. Output: flat
metrics (logged as `gen/<name>`) in four groups, each beside a reference that says what good means,
plus `report/quality.json` and PNG plots. Only aggregates are logged, never records or subject ids.

- reconstruction: prompt-aware Jaccard (`metrics.compute_reconstruction_jaccard`) and its baseline;
- fidelity: code prevalence Pearson r (share of patients / of visits holding each code), top-100
  overlap, co-occurrence correlation (pair frequencies of the 100 most frequent real codes), and total
  variation / Wasserstein-1 distances of visits-per-patient and codes-per-visit. `*_reference` is the
  same figure for a same-size sample of TRAINING patients against the held-out ones: the ceiling that
  sampling noise allows;
- validity: share of code occurrences that the age/sex rule table (`promptehr.validity.code_allowed`:
  pregnancy codes only for women aged 12-55, newborn codes below age 1, male- and female-only codes)
  rules out, beside the same rate on the real held-out patients; within-visit duplicate codes;
- privacy: share of generated patients identical to a training patient (same sequence of visit code
  sets) beside the share of held-out patients that are; nearest-neighbour Jaccard distance to the
  training set (patient = set of all its codes) of generated vs held-out patients (ratio well below 1:
  copies); membership-inference AUC of the model's own likelihood (mean NLL per code of each visit
  given the earlier ones, as generation produces it) separating training from held-out patients
  (about 0.5: no memorisation signal).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.data import Patient
from promptehr.generate import SamplingConfig, generate_patients
from promptehr.metrics import compute_reconstruction_jaccard
from promptehr.validity import code_allowed

logger = logging.getLogger(__name__)

TOP_K = 100


# ------------------------------------------------------------------ small statistics


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


def code_prevalence(patients: list[Patient], codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Share of patients and share of visits holding each code."""
    index = {c: i for i, c in enumerate(codes)}
    per_patient, per_visit = np.zeros(len(codes)), np.zeros(len(codes))
    n_visits = 0
    for p in patients:
        seen = set()
        for v in p.visits:
            n_visits += 1
            for c in set(v):
                per_visit[index[c]] += 1
                seen.add(c)
        for c in seen:
            per_patient[index[c]] += 1
    return per_patient / max(len(patients), 1), per_visit / max(n_visits, 1)


def pair_frequencies(patients: list[Patient], codes: list[str]) -> np.ndarray:
    """Share of visits holding both codes, for every pair of `codes` (upper triangle, flattened)."""
    index = {c: i for i, c in enumerate(codes)}
    rows = [[index[c] for c in set(v) if c in index] for p in patients for v in p.visits]
    x = np.zeros((len(rows), len(codes)), dtype=np.float32)
    for r, cols in enumerate(rows):
        x[r, cols] = 1.0
    co = (x.T @ x) / max(len(rows), 1)
    return co[np.triu_indices(len(codes), k=1)]


# ------------------------------------------------------------------ the four groups


def fidelity_metrics(cohort: list[Patient], real: list[Patient], top_k: int = TOP_K) -> dict:
    """Prevalence, top-k, co-occurrence and count-distribution agreement of `cohort` with `real`."""
    codes = sorted({c for group in (cohort, real) for p in group for v in p.visits for c in v})
    gen_p, gen_v = code_prevalence(cohort, codes)
    real_p, real_v = code_prevalence(real, codes)
    k = min(top_k, int((real_v > 0).sum()))
    top_real = [codes[i] for i in np.argsort(-real_v, kind="stable")[:k]]
    top_gen = {codes[i] for i in np.argsort(-gen_v, kind="stable")[:k]}
    vpp_tv, vpp_w1 = count_distances([len(p.visits) for p in cohort], [len(p.visits) for p in real])
    cpv_tv, cpv_w1 = count_distances([len(v) for p in cohort for v in p.visits], [len(v) for p in real for v in p.visits])
    return {
        "prevalence_pearson_patient": pearson(gen_p, real_p),
        "prevalence_pearson_visit": pearson(gen_v, real_v),
        "top100_overlap": len(top_gen & set(top_real)) / k if k else float("nan"),
        "cooccurrence_pearson": pearson(pair_frequencies(cohort, top_real), pair_frequencies(real, top_real)),
        "visits_per_patient_tv": vpp_tv,
        "visits_per_patient_wasserstein": vpp_w1,
        "codes_per_visit_tv": cpv_tv,
        "codes_per_visit_wasserstein": cpv_w1,
    }


def _rule_code(code: str) -> str | None:
    """The ICD-9 code the rule table checks: MIMIC-IV's `ICD9:` prefix removed; ICD-10 codes are not
    covered by the table (None)."""
    if code.startswith("ICD10:"):
        return None
    return code[5:] if code.startswith("ICD9:") else code


def validity_metrics(patients: list[Patient]) -> dict:
    """Share of code occurrences (and of patients with one) that `code_allowed` rules out for the
    patient's age and sex, and the share of code occurrences repeated inside their visit."""
    n_codes = invalid = patients_invalid = duplicates = 0
    for p in patients:
        bad = 0
        for v in p.visits:
            n_codes += len(v)
            duplicates += len(v) - len(set(v))
            for c in v:
                rc = _rule_code(c)
                bad += rc is not None and not code_allowed(rc, p.age, p.sex)
        invalid += bad
        patients_invalid += bad > 0
    return {
        "invalid_code_rate": invalid / max(n_codes, 1),
        "invalid_patient_rate": patients_invalid / max(len(patients), 1),
        "duplicate_code_rate": duplicates / max(n_codes, 1),
    }


def _signature(p: Patient) -> tuple:
    return tuple(frozenset(v) for v in p.visits)


def exact_copy_share(patients: list[Patient], train: list[Patient]) -> float:
    """Share of `patients` whose sequence of visit code sets equals a training patient's."""
    seen = {_signature(p) for p in train}
    return sum(_signature(p) in seen for p in patients) / max(len(patients), 1)


def nearest_neighbour_distances(patients: list[Patient], train: list[Patient], chunk: int = 512) -> np.ndarray:
    """Jaccard distance of each patient's code set to the nearest training patient's."""
    codes = sorted({c for group in (patients, train) for p in group for v in p.visits for c in v})
    index = {c: i for i, c in enumerate(codes)}

    def matrix(group):
        x = torch.zeros((len(group), len(codes)))
        for r, p in enumerate(group):
            x[r, [index[c] for v in p.visits for c in v]] = 1.0
        return x

    t = matrix(train)
    t_size = t.sum(1)
    out = []
    for s in range(0, len(patients), chunk):
        q = matrix(patients[s:s + chunk])
        inter = q @ t.T
        union = q.sum(1, keepdim=True) + t_size.unsqueeze(0) - inter
        out.append((1.0 - inter / union.clamp(min=1)).min(1).values)
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def patient_nll(model, tokenizer, patients: list[Patient], max_length: int = 512, batch_size: int = 64) -> np.ndarray:
    """Mean NLL per code of each patient under the model, as generation produces it: visit k given
    visits 0..k-1 and a `<v> <mask> </v>` placeholder (the collator's first-visit/next-visit rows).
    Codes unknown to the vocabulary are not scored."""
    device = next(model.parameters()).device
    ds = EHRPatientDataset(patients, tokenizer, max_length)
    collator = EHRDataCollator(tokenizer, shuffle_codes=False)
    tok = tokenizer
    rows = []  # (patient, encoder ids, labels, first target position, age, sex)
    for i in range(len(ds)):
        _, visits, age, sex = ds[i]
        for k in range(len(visits)):
            rows.append((i, *collator.cut_row(visits, k), age, sex))
    sums, counts = np.zeros(len(ds)), np.zeros(len(ds))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            batch = collator.pad([r[1] for r in chunk], [r[2] for r in chunk], [r[3] for r in chunk],
                                 [0] * len(chunk), [r[4] for r in chunk], [r[5] for r in chunk])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch)["logits"].float()
            labels = batch["labels"]
            nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            scored = batch["target_mask"] & (labels != tok.unk_token_id)
            for r, (i, *_rest) in enumerate(chunk):
                sums[i] += float(nll[r][scored[r]].sum())
                counts[i] += int(scored[r].sum())
    finally:
        model.train(was_training)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def membership_inference_auc(model, tokenizer, train: list[Patient], heldout: list[Patient], n: int, seed: int = 0,
                             max_length: int = 512) -> float:
    """ROC AUC of "lower NLL => training patient" over `n` training and `n` held-out patients."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = min(n, len(train), len(heldout))
    members = [train[i] for i in rng.choice(len(train), n, replace=False)]
    others = [heldout[i] for i in rng.choice(len(heldout), n, replace=False)]
    nll = patient_nll(model, tokenizer, members + others, max_length)
    label = np.r_[np.ones(n), np.zeros(n)]
    ok = np.isfinite(nll)
    if len(set(label[ok])) < 2:
        return float("nan")
    return float(roc_auc_score(label[ok], -nll[ok]))


# ------------------------------------------------------------------ the report


def quality_report(model, tokenizer, train: list[Patient], heldout: list[Patient], n_patients: int = 500,
                   seed: int = 0, sampling: SamplingConfig | None = None, prompt_prob: float = 0.5,
                   max_length: int = 512, batch_size: int = 256, progress: bool = False) -> tuple[dict, dict]:
    """Generate a cohort with the demographics of up to `n_patients` held-out patients and compare.

    Returns (metrics, report): flat metrics (no prefix) and a JSON-able report that adds the
    aggregates the plots are drawn from (prevalences per code, count histograms)."""
    rng = np.random.default_rng(seed)
    n = min(n_patients, len(heldout))
    real = [heldout[i] for i in sorted(rng.choice(len(heldout), n, replace=False))]
    reference = [train[i] for i in sorted(rng.choice(len(train), min(n, len(train)), replace=False))]
    cohort = generate_patients(model, tokenizer, [p.age for p in real], [p.sex for p in real], sampling,
                               seed=seed, batch_size=batch_size, progress=progress)

    metrics: dict[str, float] = {"n_patients": n}
    recon = compute_reconstruction_jaccard(model, tokenizer, heldout, train, prompt_prob=prompt_prob,
                                           n_patients=n, seed=seed, sampling=sampling)
    metrics.update(recon)
    metrics.update(fidelity_metrics(cohort, real))
    metrics.update({f"{k}_reference": v for k, v in fidelity_metrics(reference, real).items()})
    metrics["visits_per_patient_mean"] = float(np.mean([len(p.visits) for p in cohort]))
    metrics["visits_per_patient_mean_real"] = float(np.mean([len(p.visits) for p in real]))
    metrics["codes_per_visit_mean"] = float(np.mean([len(v) for p in cohort for v in p.visits]))
    metrics["codes_per_visit_mean_real"] = float(np.mean([len(v) for p in real for v in p.visits]))
    metrics.update(validity_metrics(cohort))
    metrics.update({f"{k}_real": v for k, v in validity_metrics(real).items()})

    metrics["exact_copy_share"] = exact_copy_share(cohort, train)
    metrics["exact_copy_share_heldout"] = exact_copy_share(real, train)
    nn_gen, nn_real = nearest_neighbour_distances(cohort, train), nearest_neighbour_distances(real, train)
    metrics["nn_distance_mean"] = float(nn_gen.mean())
    metrics["nn_distance_heldout_mean"] = float(nn_real.mean())
    metrics["nn_distance_ratio"] = float(nn_gen.mean() / nn_real.mean()) if nn_real.mean() > 0 else float("nan")
    metrics["membership_auc"] = membership_inference_auc(model, tokenizer, train, heldout, n, seed, max_length)

    codes = sorted({c for group in (cohort, real) for p in group for v in p.visits for c in v})
    _, gen_v = code_prevalence(cohort, codes)
    _, real_v = code_prevalence(real, codes)
    report = {
        "metrics": metrics,
        "sampling": vars(sampling or SamplingConfig()),
        "visit_prevalence": {"codes": codes, "generated": gen_v.round(6).tolist(), "real": real_v.round(6).tolist()},
        "visits_per_patient": {"generated": _histogram([len(p.visits) for p in cohort]),
                               "real": _histogram([len(p.visits) for p in real])},
        "codes_per_visit": {"generated": _histogram([len(v) for p in cohort for v in p.visits]),
                            "real": _histogram([len(v) for p in real for v in p.visits])},
    }
    return metrics, report


def _histogram(values) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values).items())}


def plot_report(report: dict, folder) -> list[Path]:
    """prevalence.png (generated vs real visit prevalence per code, log-log) and counts.png
    (visits per patient and codes per visit, generated beside real)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prev = report["visit_prevalence"]
    gen, real = np.asarray(prev["generated"]), np.asarray(prev["real"])
    floor = 0.5 / max(report["metrics"]["n_patients"], 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(np.maximum(real, floor), np.maximum(gen, floor), s=8, alpha=0.5)
    lim = [floor * 0.7, 1.0]  # codes absent from one side sit at `floor`, just inside the axes
    ax.plot(lim, lim, color="grey", lw=1)
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="real (held-out): share of visits (0 drawn at the edge)",
           ylabel="generated: share of visits",
           title=f"code prevalence, r = {report['metrics']['prevalence_pearson_visit']:.3f}")
    fig.tight_layout()
    paths = [folder / "prevalence.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("visits_per_patient", "codes_per_visit"), ("visits per patient", "codes per visit")):
        for j, (name, hist) in enumerate(report[key].items()):
            x = np.array([int(k) for k in hist], dtype=float)
            y = np.array(list(hist.values()), dtype=float)
            ax.bar(x + (j - 0.5) * 0.4, y / max(y.sum(), 1), width=0.4, label=name)
        ax.set(title=title, ylabel="share")
        ax.legend()
    fig.tight_layout()
    paths.append(folder / "counts.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def log_quality_report(tracker, metrics: dict, report: dict, step: int = 0, prefix: str = "gen/") -> None:
    """Metrics as `gen/<name>`, the report as `report/quality.json` and the plots under `report/`."""
    tracker.log_metrics({f"{prefix}{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}, step=step)
    tracker.log_dict(report, "report/quality.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plot_report(report, tmp):
            tracker.log_artifact(str(path), "report")


def run_quality_report(model, tokenizer, train: list[Patient], heldout: list[Patient], tracker, step: int = 0,
                       **kwargs) -> dict:
    """`quality_report` and `log_quality_report` in one call; returns the metrics."""
    metrics, report = quality_report(model, tokenizer, train, heldout, **kwargs)
    log_quality_report(tracker, metrics, report, step)
    logger.info("quality report (%d patients): prevalence r %.3f (reference %.3f), co-occurrence r %.3f, invalid "
                "codes %.4f (real %.4f), exact copies %.3f (held-out %.3f), NN distance ratio %.3f, membership AUC %.3f",
                metrics["n_patients"], metrics["prevalence_pearson_visit"], metrics["prevalence_pearson_visit_reference"],
                metrics["cooccurrence_pearson"], metrics["invalid_code_rate"], metrics["invalid_code_rate_real"],
                metrics["exact_copy_share"], metrics["exact_copy_share_heldout"], metrics["nn_distance_ratio"],
                metrics["membership_auc"])
    return metrics
