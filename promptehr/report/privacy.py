"""Privacy: what a released (generated) cohort, or the model itself, gives away about training patients.
Inputs: the released cohort, training and held-out patients (the model for the likelihood attack).
Outputs: exact copies, nearest-neighbour distances, membership inference by distance and by likelihood,
attribute inference beside the same attack on held-out real patients."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from promptehr.collator import EHRPatientDataset
from promptehr.patient_format import hidden_visit_row, pad_batch
from promptehr.report.stats import bootstrap_weights, interval, multi_hot, weighted_auroc
from promptehr.schema import Patient

ATTRIBUTE_KS = (1, 2, 3, 4, 5)
KNOWN_CODES = 100


def patient_signature(p: Patient) -> tuple:
    """The patient as its sequence of visit code sets (code order inside a visit is irrelevant)."""
    return tuple(frozenset(v) for v in p.visits)


def code_set(p: Patient) -> set[str]:
    return {c for v in p.visits for c in v}


def exact_copy_share(patients: list[Patient], train: list[Patient]) -> float:
    """Share of `patients` whose sequence of visit code sets equals a training patient's."""
    seen = {patient_signature(p) for p in train}
    return sum(patient_signature(p) in seen for p in patients) / max(len(patients), 1)


def nearest_neighbour_distances(patients: list[Patient], others: list[Patient], chunk: int = 512) -> np.ndarray:
    """Jaccard distance of each patient's code set to the nearest code set among `others`."""
    codes = sorted({c for group in (patients, others) for p in group for v in p.visits for c in v})
    index = {c: i for i, c in enumerate(codes)}
    t = torch.from_numpy(multi_hot([code_set(p) for p in others], index))
    t_size = t.sum(1)
    out = []
    for s in range(0, len(patients), chunk):
        q = torch.from_numpy(multi_hot([code_set(p) for p in patients[s : s + chunk]], index))
        inter = q @ t.T
        union = q.sum(1, keepdim=True) + t_size.unsqueeze(0) - inter
        out.append((1.0 - inter / union.clamp(min=1)).min(1).values)
    return torch.cat(out).numpy() if out else np.zeros(0)


# ------------------------------------------------------------------ attacks on the released cohort


def distance_membership_inference(
    members: list[Patient], nonmembers: list[Patient], released: list[Patient], n_boot: int = 200, seed: int = 0
) -> tuple[dict, dict]:
    """The attacker holds a real patient and the released cohort, and calls the patient a training
    member the closer it lies to its nearest released patient (Jaccard distance of code sets).

    Returns (metrics, distances): `membership_distance_auc` (ROC AUC of "closer => member" over the
    `members` (training) and `nonmembers` (held-out) patients, with a 95% bootstrap interval, members and
    non-members resampled separately) and `membership_distance_accuracy` (HALO's attack: member iff
    the distance is below the median of all attacked patients' distances; balanced groups). 0.5 is no
    signal for both; `distances` holds the two arrays for the plot."""
    d_in = nearest_neighbour_distances(members, released)
    d_out = nearest_neighbour_distances(nonmembers, released)
    scores, labels = -np.r_[d_in, d_out], np.r_[np.ones(len(d_in)), np.zeros(len(d_out))]
    metrics = {"membership_distance_auc": float("nan"), "membership_distance_accuracy": float("nan")}
    if len(d_in) and len(d_out):
        metrics["membership_distance_auc"] = float(roc_auc_score(labels, scores))
        threshold = np.median(np.r_[d_in, d_out])
        # mean of the two groups' hit rates: the accuracy on balanced groups whatever their sizes
        metrics["membership_distance_accuracy"] = float(((d_in < threshold).mean() + (d_out >= threshold).mean()) / 2)
        rng = np.random.default_rng(seed)
        w = np.concatenate([bootstrap_weights(len(d_in), n_boot, rng), bootstrap_weights(len(d_out), n_boot, rng)], axis=1)
        low, high = interval(weighted_auroc(scores, labels, w)) if n_boot > 0 else (float("nan"), float("nan"))
        metrics["membership_distance_auc_low"], metrics["membership_distance_auc_high"] = low, high
    return metrics, {"members": d_in, "nonmembers": d_out}


def attribute_inference_f1(
    targets: list[Patient], pool: list[Patient], known_codes: list[str], ks=ATTRIBUTE_KS
) -> dict[int, float]:
    """Attribute inference by nearest neighbours; returns {k: micro F1}.

    The attacker knows, of each target patient, which of `known_codes` it holds (and which not), and
    looks up the k patients of `pool` whose known-code patterns are closest (Hamming distance; ties in
    pool order). It predicts the target holds every other code (not in `known_codes`) that more than
    half of those k neighbours hold. F1 counts the predicted against the target's true other codes,
    summed over all targets (a target without other codes adds only its false positives)."""
    known = {c: i for i, c in enumerate(known_codes)}
    t_sets, p_sets = [code_set(p) for p in targets], [code_set(p) for p in pool]
    if not targets or not pool:
        return {k: float("nan") for k in ks}
    a, b = multi_hot(t_sets, known), multi_hot(p_sets, known)
    hamming = a.sum(1, keepdims=True) + b.sum(1)[None, :] - 2 * (a @ b.T)
    nearest = np.argsort(hamming, axis=1, kind="stable")[:, : max(ks)]
    p_other = [s - known.keys() for s in p_sets]
    out = {}
    for k in ks:
        tp = fp = fn = 0
        for i, truth in enumerate(t_sets):
            votes = Counter(c for j in nearest[i, :k] for c in p_other[j])
            guess = {c for c, n in votes.items() if n > k / 2}
            truth = truth - known.keys()
            tp, fp, fn = tp + len(guess & truth), fp + len(guess - truth), fn + len(truth - guess)
        out[k] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return out


def attribute_inference(
    targets: list[Patient],
    released: list[Patient],
    heldout: list[Patient],
    train: list[Patient],
    seed: int = 0,
    n_known: int = KNOWN_CODES,
    ks=ATTRIBUTE_KS,
) -> tuple[dict, dict]:
    """`attribute_inference_f1` on training patients (`targets`) twice: with the released cohort as
    the pool, and with as many held-out real patients (what the population alone reveals). Both
    pools have the same size (the smaller of the two, drawn at random, in random order). The known
    codes are the `n_known` codes held by the most training patients.

    Returns (metrics, per_k): `attribute_inference_f1` (the attacker's best k) and
    `attribute_inference_f1_k<k>`, each beside `..._heldout`; per_k lists both curves for the plot."""
    counts = Counter(c for p in train for c in code_set(p))
    known = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_known]]
    rng = np.random.default_rng(seed)
    m = min(len(released), len(heldout))
    curves = {}
    for name, pool in (("synthetic", released), ("heldout", heldout)):
        pick = rng.permutation(len(pool))[:m]
        curves[name] = attribute_inference_f1(targets, [pool[i] for i in pick], known, ks)
    metrics = {}
    for name, suffix in (("synthetic", ""), ("heldout", "_heldout")):
        f1 = curves[name]
        finite = [v for v in f1.values() if np.isfinite(v)]
        metrics[f"attribute_inference_f1{suffix}"] = max(finite) if finite else float("nan")
        metrics.update({f"attribute_inference_f1{suffix}_k{k}": v for k, v in f1.items()})
    metrics["attribute_inference_pool"] = m
    per_k = {"k": list(ks), "synthetic": [curves["synthetic"][k] for k in ks], "heldout": [curves["heldout"][k] for k in ks]}
    return metrics, per_k


# ------------------------------------------------------------------ the likelihood attack (model access)


@torch.no_grad()
def patient_nll(model, tokenizer, patients: list[Patient], max_length: int = 512, batch_size: int = 64) -> np.ndarray:
    """Mean NLL per code of each patient under the model, as generation produces it: visit k given
    visits 0..k-1 and a `<v> <mask> </v>` placeholder (the first-visit/next-visit rows of the format).
    Codes unknown to the vocabulary are not scored."""
    device = next(model.parameters()).device
    ds = EHRPatientDataset(patients, tokenizer, max_length)
    tok = tokenizer
    rows = []  # (patient, encoder ids, labels, first target position, age, sex)
    for i in range(len(ds)):
        _, visits, age, sex = ds[i]
        for k in range(len(visits)):
            rows.append((i, *hidden_visit_row(tok, visits, k), age, sex))
    sums, counts = np.zeros(len(ds)), np.zeros(len(ds))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            batch = pad_batch(
                tok,
                [r[1] for r in chunk],
                [r[2] for r in chunk],
                [r[3] for r in chunk],
                [0] * len(chunk),
                [r[4] for r in chunk],
                [r[5] for r in chunk],
            )
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


def membership_inference_auc(
    model, tokenizer, train: list[Patient], heldout: list[Patient], n: int, seed: int = 0, max_length: int = 512
) -> float:
    """ROC AUC of "lower NLL => training patient" over `n` training and `n` held-out patients."""
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
