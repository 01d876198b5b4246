"""The benchmarks' scoring and FLOP formulas (bench/quality.py, bench/throughput.py): the figures they
print are only as good as these pieces."""

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from promptehr.cohorts import cohort_model, sample_cohort
from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.config import load_config
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.patient_format import hidden_visit_row
from promptehr.tokenizer import DiagnosisCodeTokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = load_bench("quality")
throughput = load_bench("throughput")


@pytest.fixture(scope="module")
def small():
    patients = [p for p in sample_cohort(300, seed=5, generator="small") if len(p.visits) >= 2][:40]
    tok = DiagnosisCodeTokenizer.from_patients(patients)
    return patients, tok


def test_scored_positions_are_visit_k_and_its_close_hidden_from_the_encoder(small):
    patients, tok = small
    ds = EHRPatientDataset(patients, tok)
    rows, cuts = [], []
    for i in range(len(patients)):
        for k in range(1, len(ds.visits[i])):
            rows.append((*hidden_visit_row(tok, ds.visits[i], k), patients[i].age, 0))
            cuts.append((i, k))
    batch, scored = quality.scored_batch(tok, rows)
    assert batch["labels"].shape == scored.shape
    for j, (i, k) in enumerate(cuts):
        visits = ds.visits[i]
        labels, enc = batch["labels"][j], batch["input_ids"][j]
        positions = torch.nonzero(scored[j]).flatten()
        # scored: exactly visit k's codes and its </v>; the <v> that opens it is not scored
        assert sorted(labels[positions[:-1]].tolist()) == sorted(visits[k].tolist())
        assert labels[positions[-1]] == tok.visit_close_id and labels[positions[0] - 1] == tok.visit_open_id
        assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + len(visits[k]) + 1))
        # the encoder holds visits[:k] and a masked placeholder, never visit k itself
        enc = enc[batch["attention_mask"][j].bool()].tolist()
        history = [t for v in visits[:k] for t in (tok.visit_open_id, *v.tolist(), tok.visit_close_id)]
        assert enc == [
            tok.bos_token_id,
            *history,
            tok.visit_open_id,
            tok.mask_token_id,
            tok.visit_close_id,
            tok.eos_token_id,
        ]


def test_tighter_bound_is_the_mean_order_probability_not_the_best_order():
    """-log mean_orders P(order) - log n!: orders of a set are equally likely, so the bound averages
    their probabilities; taking the best order would claim a set probability the model does not give."""
    per_order = np.array([[1.0, 3.0], [2.0, 2.0]])
    log_fact = np.array([math.lgamma(3), math.lgamma(3)])
    mean_order, tight = quality.order_bounds(per_order, log_fact)
    assert mean_order == pytest.approx([2.0 - log_fact[0], 2.0 - log_fact[1]])
    expected = -np.log((np.exp(-1.0) + np.exp(-3.0)) / 2) - log_fact[0]
    assert tight[0] == pytest.approx(expected) and tight[0] > 1.0 - log_fact[0] + 0.5  # not the best order (1.0)
    assert tight[1] == pytest.approx(mean_order[1])  # equal orders: both bounds agree


def test_model_nll_bounds_and_optimum_are_finite(small):
    patients, tok = small
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    events, skipped = quality.next_visit_events(patients, tok)
    assert skipped == 0 and len(events) >= 40
    with torch.no_grad():
        mean_order, tight = quality.model_visit_nll(model, tok, patients, events[:10], orders=3)
    assert np.all(np.isfinite(mean_order)) and np.all(tight <= mean_order + 1e-9)
    # an untrained model is far from the optimum: ~log(vocab) nats per code
    optimum = quality.optimum_visit_nll(cohort_model("small"), patients, events[:10])
    assert np.all(optimum > 0) and mean_order.mean() > optimum.mean() + 5


def test_a_history_longer_than_the_models_rows_is_scored_on_its_latest_visits(small):
    """A patient whose history does not fit `collator.max_length` is scored as training sees it: its
    earliest visits dropped (without that, BART's position table overflows); the optimum keeps it all."""
    patients, tok = small
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    long = replace(patients[0], visits=[v for p in patients for v in p.visits])
    k = len(long.visits) - 1
    assert sum(len(v) + 2 for v in long.visits) > cfg.model.max_position_embeddings  # would overflow
    start = quality.history_start(long.visits, k, cfg.collator.max_length)
    assert start > 0 and sum(len(v) + 2 for v in long.visits[start:]) <= cfg.collator.max_length - 2
    assert sum(len(v) + 2 for v in long.visits[start - 1 :]) > cfg.collator.max_length - 2  # no more dropped than needed
    latest = replace(long, visits=long.visits[start:])
    with torch.no_grad():
        got, _ = quality.model_visit_nll(model, tok, [long], [(0, k)], orders=1, max_length=cfg.collator.max_length)
        want, _ = quality.model_visit_nll(model, tok, [latest], [(0, k - start)], orders=1)
    assert np.isfinite(got[0]) and got[0] == pytest.approx(want[0], rel=1e-5)
    assert quality.history_start(long.visits, 1, cfg.collator.max_length) == 0  # a short history is kept whole


def test_flop_formula_matches_torch_flop_counter(small):
    patients, tok = small
    cfg = load_config(ROOT / "experiments" / "base.yaml", ["collator.corruption_prob=0"])
    ds = EHRPatientDataset(patients, tok)
    collator = EHRDataCollator.from_config(tok, cfg.collator)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    model.bart.set_attn_implementation("eager")  # the counter does not count CPU sdpa kernels; eager bmm it does
    batch = collator([ds[i] for i in range(8)])
    with FlopCounterMode(display=False) as counter:
        model(**batch)["loss"].backward()
    useful, executed = throughput.batch_flops(cfg.model, len(tok), batch)
    assert executed == pytest.approx(counter.get_total_flops(), rel=0.02)  # the counter sees the padded shapes
    assert useful < executed


def test_first_code_persistence_compares_model_and_optimum(small):
    patients, tok = small
    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    events = [(i, 1) for i in range(12)]
    cohort = cohort_model("small")
    d = quality.first_code_persistence(model, tok, cohort, patients, events, samples=200)
    for key in ("model_chronic", "optimum_chronic", "model_acute", "optimum_acute"):
        assert 0.0 <= d[key] <= 1.0, key
    # the optimum repeats chronic codes (persistence 0.7-0.85); an untrained model spreads its mass
    # over the whole vocabulary, so it gives them far less and is far from the optimum
    assert any(cohort.persistence[cohort.codes.index(c)] > 0 for i, _ in events for c in patients[i].visits[0])
    assert d["optimum_chronic"] > 0.1 and d["model_chronic"] < d["optimum_chronic"] / 2
    assert d["kl"] > 0.5


def test_timed_epoch_runs_every_batch_of_a_new_epoch():
    """`bench/throughput.py --epochs`: the timed epoch is the whole epoch train() would run (every
    batch of the epoch's own plan, each through the training step), not an extrapolation."""
    from transformers import get_linear_schedule_with_warmup

    from promptehr.data import load_patients, split_patients
    from promptehr.engine import autocast_context, build_loader, build_optimizer

    cfg = load_config(ROOT / "experiments" / "tiny.yaml", ["data.synthetic.n_patients=120"])
    patients, _, _ = load_patients(cfg.data)
    train_p, val_p = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    tok = DiagnosisCodeTokenizer.from_patients(train_p, cfg.model.visit_order)
    loader, sampler, collator, _ = build_loader(cfg, tok, train_p)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    device = torch.device("cpu")
    optimizer = build_optimizer(model, cfg.training, device)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 100)
    before = model.age_head[0].weight.detach().clone()
    timed = throughput.time_epoch(
        loader, collator, 3, model, model, optimizer, scheduler, cfg.training, autocast_context(device, "fp32"), device
    )
    sampler.set_epoch(3)
    collator.set_epoch(3)
    plan = list(sampler)
    assert timed["steps"] == len(plan) > 1 and scheduler.last_epoch == len(plan)  # one optimizer step per batch
    assert timed["rows"] == sum(collator([loader.dataset[i] for i in idx])["labels"].shape[0] for idx in plan)
    assert timed["seconds"] > 0 and 0 <= timed["data_wait_share"] < 1
    assert not torch.equal(before, model.age_head[0].weight)


def score_checkpoint(generator: str, tmp_path, capsys, *flags: str, overrides=()) -> str:
    """An untrained tiny model's checkpoint on `generator`'s cohort (its tokenizer from the training
    split, as train() makes it) scored by bench/quality.py; returns what it printed."""
    from promptehr.checkpoint import save_checkpoint
    from promptehr.data import load_patients, split_patients

    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        [f"data.synthetic.generator={generator}", "data.synthetic.n_patients=1000", *overrides],
    )
    patients, _, _ = load_patients(cfg.data)
    train_patients, _ = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    tok = DiagnosisCodeTokenizer.from_patients(train_patients, cfg.model.visit_order)
    save_checkpoint(tmp_path / "ck", PromptBartWithDemographicPrediction(tok, cfg), None, None, cfg, tok, {"epoch": 0})
    try:
        assert quality.main(["--checkpoint", str(tmp_path / "ck"), "--orders", "1", *flags]) == 0
    finally:
        torch.set_grad_enabled(True)  # quality.main turns gradients off for the whole process
    return capsys.readouterr().out


def optimum_nll(out: str) -> list[float]:
    return [float(line.split()[5]) for line in out.splitlines() if line.startswith("exact cohort model")]


def test_quality_scores_fresh_patients_of_the_checkpoints_generator(tmp_path, capsys):
    """`bench/quality.py --checkpoint ... --fresh-patients N` on a model trained on the transition cohort:
    the optimum and the fresh patients come from the checkpoint's data.synthetic.generator (the hmm's
    or the small cohort's optimum would give these visits probability 0 or far less)."""
    from promptehr.checkpoint import load_checkpoint
    from promptehr.data import load_patients, split_patients

    out = score_checkpoint("transition", tmp_path, capsys, "--fresh-patients", "600")
    assert "600 FRESH patients from the cohort model" in out
    held_out, fresh = optimum_nll(out)
    _, tok, cfg, _ = load_checkpoint(tmp_path / "ck")
    cohort = cohort_model("transition")
    val = split_patients(load_patients(cfg.data)[0], cfg.data.val_fraction, cfg.data.split_seed)[1]
    new = cohort.sample(600, seed=cfg.data.synthetic.seed + 10_007)
    for printed, patients in ((held_out, val), (fresh, new)):
        events, _ = quality.next_visit_events(patients, tok)
        assert len(events) >= 10
        assert printed == pytest.approx(quality.optimum_visit_nll(cohort, patients, events).mean(), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["transition", "hmm"])
def test_quality_diagnose_on_each_mimic_scale_generator(generator, tmp_path, capsys):
    """`--diagnose` scores first visits and training patients for either generator. With an ordered
    vocabulary it splits the nats of held-out next visits by token kind: the model's split adds up to its
    NLL of those visits, the repeat baseline's to the baseline's, and on `transition` (one Bernoulli set
    per next visit) the optimum's to the exact optimum. The first-code diagnosis needs an HMM's hidden
    states and a random code order (it compares random first codes)."""
    from promptehr.baselines import NextVisitBaselines, VisitPairs
    from promptehr.checkpoint import load_checkpoint
    from promptehr.data import load_patients, split_patients

    out = score_checkpoint(generator, tmp_path, capsys, "--fresh-patients", "600", "--diagnose")
    assert len(optimum_nll(out)) == 4  # held-out, first visits, training patients, fresh patients
    assert "model, exact set NLL (codes in id order)" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("where the nats of"))
    totals = {}
    for line in lines[head + 2 : head + 5]:
        if "total" in line:
            totals[line.split()[0]] = float(line.split()[-1])
    assert set(totals) == ({"model", "repeat", "optimum"} if generator == "transition" else {"model", "repeat"})
    model, tok, cfg, _ = load_checkpoint(tmp_path / "ck")
    train, val = split_patients(load_patients(cfg.data)[0], cfg.data.val_fraction, cfg.data.split_seed)
    events = quality.next_visit_events(val, tok)[0][:300]
    with torch.no_grad():
        nll, _ = quality.model_visit_nll(model.eval(), tok, val, events, orders=1)
    assert totals["model"] == pytest.approx(nll.mean(), abs=0.01)
    index = {c: j for j, c in enumerate(tok.codes)}
    pairs = VisitPairs.from_visits(
        [(val[i].visits[k], val[i].visits[k - 1], val[i].age, val[i].sex) for i, k in events], index
    )
    repeat = NextVisitBaselines.fit(train, tok.codes).score(pairs)["repeat"]
    assert totals["repeat"] == pytest.approx(repeat.mean(), abs=0.01)
    if generator == "transition":
        exact = quality.optimum_visit_nll(cohort_model("transition"), val, events).mean()
        assert totals["optimum"] == pytest.approx(exact, abs=0.01)
    if generator == "hmm":
        out = score_checkpoint(generator, tmp_path, capsys, "--diagnose", overrides=["model.visit_order=random"])
        assert "first code of" in out and "KL(optimum || model)" in out and "mean of 1 orders" in out


def test_learnability_reference_needs_the_hidden_states_and_improves_with_patients():
    """bench/cohorts.py's known-state estimate: re-estimated from the small cohort's training visits with their
    true hidden states it comes close to the exact optimum on later patients, closer with more patients, and
    with shuffled states (the states carry no information) it is far from it."""
    cohorts = load_bench("cohorts")
    model = cohort_model("small")
    patients, states = model.sample_with_states(6000, seed=3)
    heldout = patients[5000:]
    share = {}
    for n in (500, 5000):
        nll = cohorts.next_visit_nll(cohorts.known_state_estimate(model, patients[:n], states[:n]), patients[:n], heldout)
        exact = cohorts.next_visit_nll(model, patients[:n], heldout)
        share[n] = (exact["frequency"] - nll["optimum"]) / (exact["frequency"] - exact["optimum"])
    rng = np.random.default_rng(0)
    shuffled = [list(rng.integers(0, model.n_states, len(s))) for s in states[:5000]]
    nll = cohorts.next_visit_nll(cohorts.known_state_estimate(model, patients[:5000], shuffled), patients[:5000], heldout)
    share_shuffled = (exact["frequency"] - nll["optimum"]) / (exact["frequency"] - exact["optimum"])
    assert share[5000] > 0.9 and share[5000] > share[500] + 0.02, share
    assert share_shuffled < share[5000] - 0.2, (share_shuffled, share)


def test_em_reference_learns_the_cohort_from_a_random_start():
    """bench/cohorts.py's generic learner: EM with the cohort's number of states, from a random start, closes
    most of the next-visit gap on later patients of the small cohort; with one state it cannot tell phenotypes
    apart and stays far below (so the fitted states, not the persistence it is given, do the work)."""
    cohorts = load_bench("cohorts")
    model = cohort_model("small")
    patients = model.sample(3000, seed=4)
    train, heldout = patients[:2500], patients[2500:]
    exact = cohorts.next_visit_nll(model, train, heldout)
    share = {}
    for n_states in (1, model.n_states):
        fitted = cohorts.em_estimate(model, train, n_states, iterations=4)
        nll = cohorts.next_visit_nll(fitted, train, heldout)["optimum"]
        share[n_states] = (exact["frequency"] - nll) / (exact["frequency"] - exact["optimum"])
    assert share[model.n_states] > 0.75 and share[model.n_states] > share[1] + 0.2, share


def test_noisy_or_reference_learns_the_transition_cohort():
    """bench/cohorts.py's transition reference: EM on the noisy-OR with the generator's sparsity pattern, from
    uninformed values, raises the training likelihood it tracks (which is the generator's own scoring of the fitted
    model), recovers the chronic codes' persistence (T[j, j] 0.5-0.85) where the training patients show it, and on
    later patients lands between the frequency prior and the optimum, closer with shrinkage than by maximum
    likelihood (5,000 patients are few for about 80,000 entries of T)."""
    cohorts = load_bench("cohorts")
    model = cohort_model("transition")
    patients = model.sample(6000, seed=6)
    train, heldout = patients[:5000], patients[5000:]
    fitted, trace = cohorts.noisy_or_em_estimate(model, train, iterations=10)
    own = np.mean([x for p in train for x in fitted.next_visit_log_probs(p)[1:]])
    assert trace[-1] == pytest.approx(own, rel=1e-9)
    assert np.all(np.diff(trace) > -1e-9) and trace[-1] > trace[0] + 10, trace
    indptr, indices, true_t = model.transition
    row = np.repeat(np.arange(model.n_codes), np.diff(indptr))
    followed = np.zeros(model.n_codes)  # training next visits after a visit holding the code
    for p in train:
        for visit in p.visits[:-1]:
            followed[[model.code_index(c) for c in set(visit)]] += 1
    chronic = (row == indices) & (true_t >= 0.5) & (followed[row] >= 30)
    assert chronic.sum() >= 30
    assert np.abs(fitted.transition[2][chronic] - true_t[chronic]).mean() < 0.1
    exact = cohorts.next_visit_nll(model, train, heldout)
    share = {}
    for shrinkage in (0.0, 8.0):
        fit = fitted if shrinkage == 0 else cohorts.noisy_or_em_estimate(model, train, 10, shrinkage)[0]
        share[shrinkage] = cohorts.gap_closed(exact, cohorts.model_nll(fit, heldout, cohorts.scored_events(train, heldout)))
    assert 0 < share[0.0] < share[8.0] < 1.05 and share[8.0] > 0.6, share
    # the generic learner: the support is every pair the training patients show, no entry of T known
    observed = cohorts.with_observed_support(model, train)
    pairs = {
        (j, model.code_index(c))
        for p in train
        for a, b in zip(p.visits, p.visits[1:])
        for j in {model.code_index(x) for x in a}
        for c in b
    }
    o_indptr, o_indices, _ = observed.transition
    assert set(zip(np.repeat(np.arange(model.n_codes), np.diff(o_indptr)).tolist(), o_indices.tolist())) == pairs
    generic = cohorts.noisy_or_em_estimate(observed, train, 10, 32.0)[0]
    share["generic"] = cohorts.gap_closed(exact, cohorts.model_nll(generic, heldout, cohorts.scored_events(train, heldout)))
    assert 0 < share["generic"] < share[8.0], share


copying = load_bench("copying")


@pytest.mark.parametrize("name", ["mimic3", "mimic4"])
def test_copying_bench_keeps_a_gpu_configs_recipe_and_scales_only_data_and_schedule(name):
    """The reduced-size run of a bart-base config: its shape, learning rate and batch size stay the
    config's; the cohort replaces its MIMIC data; warmup and schedule fit the shorter run."""
    path = ROOT / "experiments" / f"{name}.yaml"
    full = load_config(path, ["data.path=/nowhere"])
    cfg = load_config(path, copying.run_overrides(full, "hmm", 2, patients=1500, epochs=4, warmup_share=0.03, cpu=True))
    assert cfg.model == full.model and cfg.model.d_model == 768
    assert (cfg.training.learning_rate, cfg.training.batch_size) == (full.training.learning_rate, full.training.batch_size)
    assert (cfg.data.source, cfg.data.synthetic.generator, cfg.data.synthetic.n_patients) == ("synthetic", "hmm", 1500)
    assert (cfg.training.seed, cfg.training.num_epochs, cfg.training.precision) == (2, 4, "fp32")
    steps = 4 * math.ceil(1500 * 0.8 / 32)
    assert cfg.training.warmup_steps == round(0.03 * steps) < full.training.warmup_steps
    # without a warmup share the run keeps the config's warmup
    kept = load_config(path, copying.run_overrides(full, "hmm", 2, patients=1500, epochs=4, warmup_share=None, cpu=True))
    assert kept.training.warmup_steps == full.training.warmup_steps


def test_copying_bench_trains_every_generator_and_seed(capsys):
    """End to end on the smoke-test shape: one row per run and epoch, each run with its own seed (the
    runs differ), and the summary counts the runs that copied (this tiny model never does: exit 1)."""
    code = copying.main(
        ["--config", str(ROOT / "experiments" / "tiny.yaml"), "--generators", "small", "--seeds", "1", "2"]
        + ["--patients", "200", "--epochs", "5", "--stop-after", "2"]
    )
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("small ")]
    # 160 training patients in batches of 16: 10 steps per epoch; stopped after 2 of the schedule's 5 epochs
    assert [(r[1], r[2], r[3]) for r in rows] == [("1", "1", "10"), ("1", "2", "20"), ("2", "1", "10"), ("2", "2", "20")]
    assert rows[1][4:] != rows[3][4:]  # the seed reaches training
    assert "schedule of 5 epochs" in out
    assert code == 1 and "0 of 2 runs learned to copy within 2 epochs" in out
    # a schedule shorter than --stop-after: the runs end with it, and the summary says so
    copying.main(
        ["--config", str(ROOT / "experiments" / "tiny.yaml"), "--generators", "small", "--seeds", "1"]
        + ["--patients", "200", "--epochs", "1"]
    )
    assert "0 of 1 runs learned to copy within 1 epochs" in capsys.readouterr().out


def test_first_copying_epoch_uses_the_stuck_warnings_limit():
    from promptehr.validation import COPY_RATIO_LIMIT

    def m(epoch, ratio):
        return {"epoch": epoch, "perplexity_reconstruction": ratio * 400, "perplexity_reconstruction_frequency": 400}

    assert copying.first_copying_epoch([m(1, 0.5), m(2, COPY_RATIO_LIMIT * 0.9), m(3, 0.001)]) == 2
    assert copying.first_copying_epoch([m(1, 0.5), m(2, COPY_RATIO_LIMIT)]) is None


def test_an_ordered_models_quality_score_is_its_validation_next_visit_nll(tmp_path):
    """Two implementations of one number: with `model.visit_order: frequency` both the validation
    protocol's val/next_visit_nll and bench/quality.py's model NLL are the exact NLL of the held-out
    next visits' code sets (one order, no log n!), so on the same held-out split they agree."""
    from promptehr.data import load_patients, split_patients
    from promptehr.validation import ValidationProtocol

    cfg = load_config(ROOT / "experiments" / "tiny.yaml", ["data.synthetic.n_patients=600"])
    assert cfg.model.visit_order == "frequency"
    patients, _, _ = load_patients(cfg.data)
    train_p, val_p = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    tok = DiagnosisCodeTokenizer.from_patients(train_p, "frequency")
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    val_nll = ValidationProtocol(cfg, tok, train_p, val_p).evaluate(model, "cpu", jaccard=False)["next_visit_nll"]
    events, _ = quality.next_visit_events(val_p, tok)
    with torch.no_grad():
        mean_order, tight = quality.model_visit_nll(model, tok, val_p, events, orders=4)
    assert len(events) >= 20 and np.array_equal(mean_order, tight)
    assert mean_order.mean() == pytest.approx(val_nll, abs=1e-3)


def test_bernoulli_tokens_in_id_order_sum_to_the_set_likelihood():
    """The token split of `nats_by_token_kind` (--diagnose) must add up to the set's NLL under the same
    Bernoulli model, every set including the empty-visit conditioning, and sum to 1 over next tokens."""
    from promptehr.baselines import bernoulli_set_nll

    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.6, size=12)
    for _ in range(20):
        y = rng.random(12) < 0.3
        if not y.any():
            continue
        targets = np.flatnonzero(y)
        got = -quality.bernoulli_token_logps(p, targets).sum()
        assert got == pytest.approx(bernoulli_set_nll(p[None], y[None].astype(float))[0], rel=1e-9)
    last = 4  # after code 4 the next token is a code above 4 or </v>: one distribution
    nexts = [quality.bernoulli_token_logps(p, [0, last, c])[2] for c in range(last + 1, 12)]
    close = quality.bernoulli_token_logps(p, [0, last])[2]
    assert np.exp(nexts).sum() + np.exp(close) == pytest.approx(1.0)
