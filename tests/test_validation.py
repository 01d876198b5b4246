"""The validation protocol: one exam per data split, metrics by what the encoder could see, model
selection by held-out next-visit likelihood, and a champion gate that compares like with like."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from promptehr.collator import TASK_ID
from promptehr.config import load_config
from promptehr.data import split_patients
from promptehr.patient_format import BANNED_LOGIT, grammar_mask
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import MLflowTracker, Tracker
from promptehr.train import train
from promptehr.validation import ValidationProtocol, protocol_id

ROOT = Path(__file__).resolve().parents[1]
NEXT = TASK_ID["next_visit_prediction"]


@pytest.fixture(scope="module")
def split(cohort):
    train_p, val_p = split_patients(cohort, 0.2, 0)
    return train_p, val_p, DiagnosisCodeTokenizer.from_patients(train_p)


def tiny(*overrides):
    return load_config(ROOT / "experiments" / "tiny.yaml", list(overrides))


def rows_of(protocol):
    return [(r[0].tolist(), r[1].tolist(), r[2], r[3], r[6].tolist(), r[7]) for r in protocol.rows]


def test_rows_and_id_do_not_change_with_training_knobs(split):
    """corruption settings, the training seed and other trial knobs leave the exam as it is; the
    protocol's own settings, max_length and the held-out patients change it."""
    train_p, val_p, tok = split
    base = ValidationProtocol(tiny(), tok, train_p, val_p)
    for knobs in (
        ["collator.corruption_prob=0.3", "collator.lambda_poisson=2.0", "training.seed=7"],
        [
            "collator.corruption_prob=0.7",
            "collator.lambda_poisson=5.0",
            "collator.del_probability=0.4",
            "training.learning_rate=1e-5",
            "model.age_loss_weight=0.01",
            "training.seed=123",
        ],
    ):
        other = ValidationProtocol(tiny(*knobs), tok, train_p, val_p)
        assert other.id == base.id
        assert rows_of(other) == rows_of(base)
    for changed in (["validation.seed=1"], ["validation.corruption_prob=0.9"], ["collator.max_length=64"]):
        assert ValidationProtocol(tiny(*changed), tok, train_p, val_p).id != base.id, changed
    assert protocol_id(tiny(), train_p, val_p[1:]) != base.id
    assert tiny("validation.batch_size=7") and protocol_id(tiny("validation.batch_size=7"), train_p, val_p) == base.id


def test_rows_are_the_held_out_patients_with_every_next_visit(split):
    train_p, val_p, tok = split
    protocol = ValidationProtocol(tiny(), tok, train_p, val_p)
    whole = [r for r in protocol.rows if r[3] in (TASK_ID["reconstruction"], TASK_ID["denoising"])]
    assert len(whole) == len(val_p) and sum(r[3] == TASK_ID["first_visit"] for r in protocol.rows) == len(val_p)
    assert sum(r[3] == NEXT for r in protocol.rows) == sum(len(p.visits) - 1 for p in val_p)
    assert 0.3 < np.mean([r[3] == TASK_ID["denoising"] for r in whole]) < 0.7

    def sets(visits):
        return tuple(frozenset(v) for v in visits)

    def decode(labels):
        visits, cur = [], None
        for t in labels.tolist():
            if t == tok.visit_open_id:
                cur = []
            elif t == tok.visit_close_id:
                visits.append(frozenset(cur))
            elif cur is not None and t >= tok.n_special or t == tok.unk_token_id:
                cur.append(tok.id_to_token[t])
        return tuple(visits)

    held_out = {sets([[c if c in tok.token_to_id else "<unk>" for c in v] for v in p.visits]) for p in val_p}
    training = {sets(p.visits) for p in train_p}
    labels = {decode(r[1]) for r in whole}
    assert labels == held_out and not (labels & training - held_out)
    # next-visit rows hide visit k: the encoder holds visits < k and a <mask> placeholder, and every
    # code of visit k is marked unseen; the history is seen
    for enc, lab, start, task, unseen, _event in rows_of(protocol):
        if task != NEXT:
            continue
        stop = start + lab[start:].index(tok.visit_close_id)
        assert enc[-4:] == [tok.visit_open_id, tok.mask_token_id, tok.visit_close_id, tok.eos_token_id]
        assert all(unseen[start:stop]) and not any(unseen[:start]) and not any(unseen[stop:])
        assert not set(lab[start:stop]) & set(enc[enc.index(tok.mask_token_id) - 1 :])


def split_visits(ids, tok) -> list[list[int]]:
    visits = []
    for t in ids:
        if t == tok.visit_open_id:
            visits.append([])
        elif t != tok.visit_close_id and visits and t not in (tok.eos_token_id, tok.bos_token_id):
            visits[-1].append(t)
    return visits


def test_unseen_codes_are_exactly_what_the_encoder_lost(split):
    train_p, val_p, tok = split
    protocol = ValidationProtocol(tiny("validation.corruption_prob=1.0"), tok, train_p, val_p)
    n_unseen = 0
    for enc, lab, _, task, unseen, _ in rows_of(protocol):
        if task != TASK_ID["denoising"]:
            continue
        enc_visits, lab_visits = split_visits(enc, tok), split_visits(lab, tok)
        assert len(enc_visits) == len(lab_visits)
        flags = iter(unseen[i] for i, t in enumerate(lab) if t >= tok.n_special)
        for shown, visit in zip(enc_visits, lab_visits):
            for t in visit:
                if t >= tok.n_special:
                    assert next(flags) == (t not in shown)
        n_unseen += sum(unseen)
    assert n_unseen > 0
    clean = ValidationProtocol(tiny("validation.corruption_prob=0.0"), tok, train_p, val_p)
    assert not any(u for _, _, _, task, unseen, _ in rows_of(clean) if task == TASK_ID["reconstruction"] for u in unseen)


class CopyOracle(nn.Module):
    """A stand-in model that knows every label the encoder shows (logit +30) and nothing else
    (uniform over what the patient format allows): what a pure copier scores."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, labels, unseen_mask, **_):
        v = len(self.tok)
        logits = torch.zeros((*labels.shape, v))
        known = (labels >= 0) & ~unseen_mask
        logits[known] = nn.functional.one_hot(labels[known], v).float() * 30.0
        logits = logits.masked_fill(grammar_mask(labels, self.tok, v), BANNED_LOGIT)
        zero = self.weight.sum() * 0
        return {"logits": logits, "loss": zero, "lm_loss": zero, "age_loss": zero, "sex_loss": zero}


def test_a_copier_scores_copying_as_copying_and_nothing_else(split):
    """TPL, next-visit NLL and the perplexity of unseen codes count only what the encoder hid; the
    reconstruction rows' perplexity is the copy score."""
    train_p, val_p, tok = split
    protocol = ValidationProtocol(tiny(), tok, train_p, val_p)
    m = protocol.evaluate(CopyOracle(tok), "cpu", jaccard=False)
    assert m["perplexity_reconstruction"] < 1.01
    n_codes = tok.n_codes
    for key in ("perplexity", "tpl", "perplexity_first_visit"):
        assert n_codes / 2 < m[key] < n_codes * 1.01, (key, m[key])
    assert m["next_visit_nll"] > m["next_visit_nll_frequency"] > m["next_visit_nll_repeat"]
    assert m["next_visits"] == protocol.pairs.n_events > 0


def test_unknown_codes_are_left_out_the_same_way_for_model_and_baselines(split):
    train_p, val_p, tok = split
    small_vocab = DiagnosisCodeTokenizer(tok.codes[: len(tok.codes) // 2])
    protocol = ValidationProtocol(tiny(), small_vocab, train_p, val_p)
    n_next = sum(len(p.visits) - 1 for p in val_p)
    scored = [r for r in protocol.rows if r[7] >= 0]
    assert len(scored) == protocol.pairs.n_events == n_next - protocol.n_excluded and protocol.n_excluded > 0
    assert all(
        not (r[1][r[2] :] == small_vocab.unk_token_id)[: list(r[1][r[2] :]).index(small_vocab.visit_close_id)].any()
        for r in scored
    )
    torch.manual_seed(0)
    from promptehr.model import PromptBartWithDemographicPrediction

    m = protocol.evaluate(PromptBartWithDemographicPrediction(small_vocab, tiny()), "cpu", jaccard=False)
    assert m["next_visit_excluded_share"] == pytest.approx(protocol.n_excluded / n_next)
    assert 0 < m["unk_label_share"] < 1 and math.isfinite(m["perplexity"])


def test_same_model_same_numbers_whatever_the_training_knobs(tmp_path):
    """Through the CLI users call: `evaluate --no-tracking --out DIR` writes validation.json, the same
    for any collator.* / training.seed override, and equal to what train() logged for that checkpoint."""
    import json

    from promptehr.cli import main

    cfg = tiny(
        f"training.checkpoint_dir={tmp_path / 'ck'}",
        "data.synthetic.n_patients=200",
        "training.num_epochs=1",
        "training.quality_report=false",
        "tracking.n_sample_patients=0",
    )
    result = train(cfg, Tracker())
    outs = []
    for i, overrides in enumerate(["", "collator.corruption_prob=0.7 collator.lambda_poisson=5 training.seed=9"]):
        out = tmp_path / f"q{i}"
        args = ["evaluate", "--model", result["best_checkpoint"], "--no-tracking", "--out", str(out), "--n-patients", "20"]
        assert main(args + (["--overrides", overrides] if overrides else [])) == 0
        outs.append(json.loads((out / "validation.json").read_text()))
    assert outs[0] == outs[1]
    best = result["best_metrics"]
    for key in ("next_visit_nll", "tpl", "perplexity", "perplexity_reconstruction", "loss", "reconstruction_jaccard"):
        assert outs[0][key] == pytest.approx(best[key], rel=1e-5), key
    assert outs[0]["protocol_id"] == result["protocol_id"]


def test_best_model_is_the_epoch_with_the_lowest_next_visit_nll(tmp_path):
    seen = []
    cfg = tiny(
        f"training.checkpoint_dir={tmp_path / 'ck'}",
        "data.synthetic.n_patients=200",
        "training.num_epochs=4",
        "training.learning_rate=3e-3",
        "validation.jaccard_patients=0",
        "training.quality_report=false",
    )
    result = train(cfg, Tracker(), on_validate=lambda epoch, m: seen.append(dict(m)))
    best = min(seen, key=lambda m: m["next_visit_nll"])
    assert result["best_metrics"]["epoch"] == best["epoch"]
    assert result["best_score"] == pytest.approx(best["next_visit_nll"])
    from promptehr.checkpoint import read_metadata

    assert read_metadata(result["best_checkpoint"])["epoch"] + 1 == best["epoch"]


@pytest.mark.slow
def test_champion_gate_compares_on_one_protocol_and_rescores_a_legacy_champion(tmp_path):
    """A champion registered before protocols existed (no protocol id, only a val_loss) is re-scored
    on the new version's protocol before the comparison; then versions compare on that protocol."""
    import mlflow

    from promptehr.checkpoint import read_metadata
    from promptehr.registry import log_pyfunc_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    common = (
        "data.synthetic.n_patients=200",
        "validation.jaccard_patients=0",
        "training.quality_report=false",
        "tracking.n_sample_patients=0",
    )
    weak = train(
        tiny(f"training.checkpoint_dir={tmp_path / 'w'}", "training.num_epochs=1", "training.learning_rate=1e-6", *common),
        Tracker(),
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("gate").experiment_id):
        legacy = str(log_pyfunc_model(weak["best_checkpoint"], "promptehr").registered_model_version)
    meta = read_metadata(weak["best_checkpoint"])
    client.set_model_version_tag("promptehr", legacy, "data_fingerprint", meta["data_fingerprint"])
    client.set_model_version_tag("promptehr", legacy, "val_loss", "0.0001")  # the old gate would never replace it
    client.set_registered_model_alias("promptehr", "champion", legacy)

    good = train(
        tiny(f"training.checkpoint_dir={tmp_path / 'g'}", "training.num_epochs=3", *common), MLflowTracker(uri, "gate")
    )
    assert good["model"]["champion"] is True
    old = client.get_model_version("promptehr", legacy)
    assert old.tags["protocol_id"] == good["protocol_id"] and old.tags["rescored"] == "true"
    weak_score = float(old.tags["next_visit_nll"])
    assert weak_score > good["best_score"]
    assert weak_score == pytest.approx(weak["best_score"], rel=1e-5)  # the same exam, the same number
    new = client.get_model_version_by_alias("promptehr", "champion")
    assert new.tags["protocol_id"] == good["protocol_id"] and float(new.tags["next_visit_nll"]) == pytest.approx(
        good["best_score"]
    )
    worse = train(
        tiny(f"training.checkpoint_dir={tmp_path / 'x'}", "training.num_epochs=1", "training.learning_rate=1e-6", *common),
        MLflowTracker(uri, "gate"),
    )
    assert worse["model"]["champion"] is False
    assert client.get_model_version_by_alias("promptehr", "champion").version == new.version


def test_baselines_are_fitted_on_training_patients_never_on_the_scored_visits():
    """Held-out patients who repeat their last visit exactly, training patients who never do: a
    repeat weight fitted on the scored visits would make the repeat baseline look excellent; fitted
    on the training next visits it is no better than the prior."""
    from promptehr.schema import Patient

    rng = np.random.default_rng(0)
    codes = [f"C{i:02d}" for i in range(40)]

    def visit():
        return [str(c) for c in rng.choice(codes, 4, replace=False)]

    train_p = []
    for i in range(200):
        first = visit()
        train_p.append(Patient(f"t{i}", 60.0, "F", [first, [c for c in visit() if c not in first] or [codes[0]]]))
    val_p = []
    for i in range(30):
        v = visit()
        val_p.append(Patient(f"v{i}", 60.0, "F", [v, list(v)]))
    tok = DiagnosisCodeTokenizer(codes)
    b = ValidationProtocol(tiny(), tok, train_p, val_p).baselines
    assert b["repeat"].mean() > b["frequency"].mean() - 0.5
    assert b["code_repeat"].mean() > b["code_frequency"].mean() - 0.1


def test_copy_warning_thresholds():
    from promptehr.validation import COPY_CHECK_EPOCH, COPY_CHECK_STEPS, COPY_RATIO_LIMIT, copy_warning

    healthy = {"perplexity_reconstruction": 3.0, "perplexity_reconstruction_frequency": 770.0, "epoch": COPY_CHECK_EPOCH}
    stuck = {**healthy, "perplexity_reconstruction": 157.0}
    steps = COPY_CHECK_STEPS
    assert copy_warning(healthy, steps) is None
    assert "stuck" in copy_warning(stuck, steps) and "learning_rate" in copy_warning(stuck, steps)
    assert copy_warning({**stuck, "epoch": COPY_CHECK_EPOCH - 1}, steps) is None  # too early to tell
    assert copy_warning(stuck, COPY_CHECK_STEPS - 1) is None  # 3 short epochs of a small cohort: too early
    assert copy_warning({**stuck, "epoch": COPY_CHECK_EPOCH + 5}, 10 * steps) is not None
    border = {**healthy, "perplexity_reconstruction": 770.0 * COPY_RATIO_LIMIT * 1.01}
    assert copy_warning(border, steps) is not None


def test_a_stuck_run_says_so_in_the_log_and_on_the_run(tmp_path, caplog):
    """A run that cannot learn (learning rate ~0) is still at the frequency level once it has had
    3 validations and COPY_CHECK_STEPS optimizer steps: a warning in the log and a `promptehr.stuck`
    tag on the MLflow run, at the first epoch past both (120 training patients, batch 1: epoch 7)."""
    import logging

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("stuck", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = tiny(
        f"training.checkpoint_dir={tmp_path / 'ck'}",
        "data.synthetic.n_patients=150",
        "training.batch_size=1",
        "training.num_epochs=7",
        "training.learning_rate=1e-9",
        "validation.jaccard_patients=0",
        "training.quality_report=false",
        "tracking.n_sample_patients=0",
        "tracking.register_model=false",
    )
    with caplog.at_level(logging.WARNING, logger="promptehr.train"):
        result = train(cfg, MLflowTracker(uri, "stuck", register_model=False))
    assert "training looks stuck: after 7 epochs (840 steps)" in caplog.text
    assert "after 6 epochs" not in caplog.text  # 720 steps: too early
    tags = mlflow.MlflowClient(uri).get_run(result["run_id"]).data.tags
    assert tags["promptehr.stuck"].startswith("epoch 7:")
    # and its best model is no better than repeating the previous visit: said once, at the end
    assert caplog.text.count("no better than repeating the previous visit") == 1
    assert tags["promptehr.below_repeat"].startswith("the best model predicts held-out next visits no better")


def test_repeat_warning_compares_the_model_with_the_repeat_baseline():
    from promptehr.validation import repeat_warning

    assert repeat_warning({"next_visit_nll": 50.0, "next_visit_nll_repeat": 54.1}) is None
    said = repeat_warning({"next_visit_nll": 59.8, "next_visit_nll_repeat": 54.1})
    assert "59.80 nats per visit against the repeat baseline's 54.10" in said
    assert repeat_warning({"next_visit_nll": float("nan"), "next_visit_nll_repeat": 54.1}) is None  # nothing scored
    assert repeat_warning({}) is None
