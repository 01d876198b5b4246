import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.config import load_config
from promptehr.data import split_patients
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.patient_format import BANNED_LOGIT, with_closing_token
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.validation import ValidationProtocol


@pytest.fixture(scope="module")
def parts(cohort):
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml")
    train, val = split_patients(cohort, 0.2, 0)
    tok = DiagnosisCodeTokenizer.from_patients(train)
    return cfg, tok, train, val


def loader(tok, patients, seed=0, batch_size=32):
    ds = EHRPatientDataset(patients, tok)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=EHRDataCollator(tok, seed=seed))


def test_forward_backward_and_outputs(parts):
    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    batch = next(iter(loader(tok, train)))
    out = model(**batch)
    assert out["logits"].shape == (*batch["labels"].shape, len(tok))
    expected = out["lm_loss"] + cfg.model.age_loss_weight * out["age_loss"] + cfg.model.sex_loss_weight * out["sex_loss"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in (
        "encoder_prompt.age_weight",
        "decoder_prompt.sex_embedding.weight",
        "age_head.0.weight",
        "sex_head.2.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_the_recurrence_bonus_raises_the_previous_visits_codes_in_the_hidden_visit_only(parts):
    """At a hidden visit's positions (its codes and `</v>`) the logits of the previous visit's codes
    move by the bonus; every other logit, and every logit of the rows and positions that hide nothing,
    stays. Its parameters start at 0 and get gradients from the next-visit rows."""
    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    batch = next(iter(loader(tok, train, batch_size=64)))
    hidden = with_closing_token(batch["target_mask"])
    has_previous = (batch["previous_visit"] != tok.pad_token_id).any(1)
    assert (hidden.any(1) & has_previous).sum() >= 3 and (~hidden.any(1)).sum() >= 3  # next-visit and other rows
    assert all(float(p.detach().abs().sum()) == 0 for p in model.recurrence.parameters())
    out = model(**batch)
    out["loss"].backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.recurrence.parameters())
    with torch.no_grad():
        before = model(**batch)["logits"]
        model.recurrence.bias.fill_(2.0)
        after = model(**batch)["logits"]
    expected = torch.zeros_like(before, dtype=torch.bool)
    for i, t in torch.nonzero(hidden).tolist():
        codes = batch["previous_visit"][i]
        expected[i, t, codes[codes != tok.pad_token_id]] = True
    expected &= before > BANNED_LOGIT / 2  # what the grammar bans stays banned
    moved = (after - before).abs() > 1e-4
    assert expected.sum() > 20
    assert torch.equal(moved, expected)
    torch.testing.assert_close((after - before)[expected], torch.full_like(before[expected], 2.0))


def test_target_visit_loss_weight_weighs_the_hidden_visit(parts):
    import copy

    import torch.nn.functional as F

    cfg, tok, train, _ = parts
    batch = next(iter(loader(tok, train)))
    assert batch["target_mask"].any()
    outs = {}
    for w in (1.0, 5.0):
        mcfg = copy.deepcopy(cfg)
        mcfg.model.target_visit_loss_weight = w
        torch.manual_seed(0)
        outs[w] = PromptBartWithDemographicPrediction(tok, mcfg).eval()(**batch)
    labels, target = batch["labels"], batch["target_mask"]
    nll = F.cross_entropy(outs[5.0]["logits"].transpose(1, 2), labels.clamp(min=0), reduction="none")
    valid = labels != -100
    hidden = target.clone()
    hidden[:, 1:] |= target[:, :-1]
    assert (labels[hidden & ~target] == tok.visit_close_id).all()  # the token after the codes is </v>
    weight = valid.float() + 4.0 * hidden.float()
    aux = cfg.model.age_loss_weight * outs[5.0]["age_loss"] + cfg.model.sex_loss_weight * outs[5.0]["sex_loss"]
    # the reported lm_loss stays the plain mean over label tokens; the objective weighs the hidden visit
    assert torch.allclose(outs[5.0]["lm_loss"], nll[valid].mean(), atol=1e-5)
    assert torch.allclose(outs[5.0]["lm_loss"], outs[1.0]["lm_loss"])
    assert torch.allclose(outs[5.0]["loss"], (nll * weight).sum() / weight.sum() + aux, atol=1e-5)
    assert not torch.allclose(outs[5.0]["loss"], outs[1.0]["loss"])
    mcfg.model.target_visit_loss_weight = -1.0
    with pytest.raises(ValueError, match="target_visit_loss_weight"):
        PromptBartWithDemographicPrediction(tok, mcfg)


def test_prompts_change_the_predictions(parts):
    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    batch = next(iter(loader(tok, train)))
    a = model(**batch)["logits"]
    flipped = dict(batch, x_cat=1 - batch["x_cat"], x_num=batch["x_num"] + 30)
    b = model(**flipped)["logits"]
    assert (a - b).abs().max() > 1e-4  # the prompts reach encoder and decoder


def test_aux_heads_cannot_read_the_prompts(parts):
    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    batch = next(iter(loader(tok, train)))
    seen = []
    hooks = [
        model.age_head.register_forward_hook(lambda m, i, o: seen.append(i[0].clone())),
        model.sex_head.register_forward_hook(lambda m, i, o: seen.append(i[0].clone())),
    ]
    model(**batch)
    model(**dict(batch, x_cat=1 - batch["x_cat"], x_num=torch.rand_like(batch["x_num"]) * 90))
    for h in hooks:
        h.remove()
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    # ... but they do read the codes
    feats, _ = model.demographic_features(batch["input_ids"])
    feats2, _ = model.demographic_features(batch["input_ids"].roll(1, dims=0))
    assert torch.equal(feats, seen[0]) and not torch.equal(feats, feats2)


def test_aux_losses_are_means_over_the_rows_that_have_codes(parts):
    import torch.nn.functional as F

    from promptehr.model import MAX_AGE

    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    batch = next(iter(loader(tok, train)))
    # rows 0-2 become placeholders (no code in the encoder input); their targets are made absurd,
    # so that any weight they kept would move the losses
    ids = batch["input_ids"].clone()
    ids[:3] = torch.where(ids[:3] >= tok.n_special, tok.mask_token_id, ids[:3])
    feats, has_codes = model.demographic_features(ids)
    assert not has_codes[:3].any() and has_codes.sum() >= len(ids) // 2  # (first-visit rows read nothing too)
    x_num, x_cat = batch["x_num"].clone(), batch["x_cat"].clone()
    x_num[~has_codes, 0] = 1e4
    out = model(**dict(batch, input_ids=ids, x_num=x_num, x_cat=x_cat))
    age_pred, sex_logits = model.age_head(feats).squeeze(-1), model.sex_head(feats)
    assert torch.allclose(out["age_loss"], F.mse_loss(age_pred[has_codes], x_num[has_codes, 0] / MAX_AGE), atol=1e-6)
    assert torch.allclose(out["sex_loss"], F.cross_entropy(sex_logits[has_codes], x_cat[has_codes, 0].long()), atol=1e-6)
    # a batch of placeholder rows only: nothing to read, zero aux losses and zero (not NaN) gradients
    model.train()
    ids_all = torch.where(ids >= tok.n_special, tok.mask_token_id, ids)
    out = model(**dict(batch, input_ids=ids_all, x_num=x_num))
    assert out["age_loss"].item() == 0.0 and out["sex_loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grad = model.age_head[2].weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_training_forward_traces_as_one_graph(parts):
    """torch.compile must see the whole training forward (loss included) as one graph: a graph break
    (a data-dependent branch, boolean indexing) splits the compiled step and, on a GPU, forces a host
    sync every step. The eager backend traces with dynamo without compiling kernels (fast on CPU)."""
    torch._dynamo.reset()
    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    batch = next(iter(loader(tok, train)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises at the first graph break
    model.eval()  # no dropout: the traced and the eager forward must agree
    out, eager = compiled(**batch), model(**batch)
    for key in ("loss", "lm_loss", "age_loss", "sex_loss"):
        assert torch.allclose(out[key], eager[key], atol=1e-5), key
    model.train()  # the training step itself (dropout on in tiny.yaml), with its backward
    compiled(**batch)["loss"].backward()
    assert model.age_head[0].weight.grad.abs().sum() > 0
    torch._dynamo.reset()


def evaluate(model, cfg, tok, train, val) -> dict:
    return ValidationProtocol(cfg, tok, train, val).evaluate(model, torch.device("cpu"), jaccard=False)


def test_untrained_perplexity_is_of_the_order_of_the_vocabulary(parts):
    cfg, tok, train, val = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    metrics = evaluate(model, cfg, tok, train, val)
    assert len(tok) / 3 < metrics["perplexity"] < len(tok) * 3, (metrics["perplexity"], len(tok))
    assert len(tok) / 3 < metrics["tpl"] < len(tok) * 3
    assert metrics["lm_loss"] == pytest.approx(math.log(len(tok)), rel=0.2)


def test_a_few_hundred_steps_bring_perplexity_far_down(parts):
    cfg, tok, train, val = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    before = evaluate(model, cfg, tok, train, val)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    steps, epoch = 0, 0
    while steps < 300:
        collator = EHRDataCollator(tok, seed=epoch)
        for batch in DataLoader(EHRPatientDataset(train, tok), batch_size=16, shuffle=True, collate_fn=collator):
            loss = model(**batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if steps == 300:
                break
        epoch += 1
    after = evaluate(model, cfg, tok, train, val)
    assert after["perplexity_reconstruction"] < before["perplexity_reconstruction"] / 3
    assert after["perplexity"] < before["perplexity"] / 2.5, (before["perplexity"], after["perplexity"])
    assert after["tpl"] < before["tpl"] / 2.5
    # and it already beats the code-frequency priors on the hidden next visits
    assert after["tpl"] < after["tpl_frequency_baseline"]
    assert after["next_visit_nll"] < after["next_visit_nll_frequency"] < before["next_visit_nll"]


def test_model_distribution_follows_the_grammar(parts):
    from promptehr.patient_format import grammar_mask

    cfg, tok, train, _ = parts
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    batch = next(iter(loader(tok, train)))
    batch["labels"][0, 1] = tok.unk_token_id
    out = model(**batch)
    probs = out["logits"].softmax(-1)
    banned = grammar_mask(batch["labels"], tok, len(tok))
    assert probs[banned].max() == 0.0
    valid = batch["labels"] >= 0
    assert torch.allclose(probs.sum(-1)[valid], torch.ones(int(valid.sum())))
    assert torch.isfinite(out["loss"])
    # a forbidden label costs a large but finite loss rather than an infinite one
    assert torch.isfinite(
        model(
            **dict(
                batch, labels=batch["labels"].where(batch["labels"] != tok.visit_close_id, torch.tensor(tok.mask_token_id))
            )
        )["loss"]
    )


def test_output_bias_starts_at_the_log_frequency_and_is_learned(parts, tmp_path):
    """model.output_bias: a per-token output bias, started at the log frequency of the training codes
    (specials at 0), trained with the rest, saved and loaded with the checkpoint."""
    from collections import Counter

    from promptehr.checkpoint import load_checkpoint, save_checkpoint

    cfg, tok, train, val = parts
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml", ["model.output_bias=true"])
    counts = Counter(c for p in train for v in p.visits for c in v)
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg)
    model.init_output_bias([counts[c] for c in tok.codes])
    bias = model.output_bias.detach()
    assert torch.all(bias[: tok.n_special] == 0)
    frequent, rare = tok.encode_code(counts.most_common()[0][0]), tok.encode_code(counts.most_common()[-1][0])
    assert bias[frequent] - bias[rare] == pytest.approx(
        math.log((counts.most_common()[0][1] + 1) / (counts.most_common()[-1][1] + 1)), rel=1e-4
    )
    # the untrained model already predicts frequent codes as more likely
    batch = EHRDataCollator(tok, seed=0)([EHRPatientDataset(val, tok)[i] for i in range(8)])
    logits = model(**batch)["logits"]
    inside = (
        (batch["labels"] >= tok.n_special)
        & (logits[..., frequent] > BANNED_LOGIT / 2)
        & (logits[..., rare] > BANNED_LOGIT / 2)
    )
    assert inside.sum() > 50 and torch.all(logits[inside][:, frequent] > logits[inside][:, rare])
    model(**batch)["loss"].backward()
    assert model.output_bias.grad.abs().sum() > 0
    save_checkpoint(tmp_path / "ck", model, None, None, cfg, tok, {"epoch": 0})
    loaded = load_checkpoint(tmp_path / "ck")[0]
    assert torch.equal(loaded.output_bias, model.output_bias)


def set_probabilities(model, tok, history, age=60.0, sex=0):
    """P(next visit = S | history) for every non-empty code set S, teacher-forced through the training
    forward: the visit written as `patient_format.hidden_visit_row` writes it, its codes and `</v>`."""
    import itertools

    import numpy as np

    from promptehr.patient_format import arrange_visits, hidden_visit_row, pad_batch, with_closing_token

    codes = range(tok.n_special, len(tok))
    sets = [s for n in range(1, len(codes) + 1) for s in itertools.combinations(codes, n)]
    rows = []
    for s in sets:
        visits = arrange_visits(tok, [np.array(v) for v in history] + [np.array(s)], np.random.default_rng(0))
        rows.append(hidden_visit_row(tok, visits, len(visits) - 1))
    batch = pad_batch(tok, *zip(*rows), [2] * len(rows), [age] * len(rows), [sex] * len(rows))
    with torch.no_grad():
        logp = model(**batch)["logits"].log_softmax(-1)
    token = logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return sets, (token * with_closing_token(batch["target_mask"])).sum(1).exp()


@pytest.mark.parametrize("seed", [0, 1])
def test_an_ordered_vocabulary_gives_each_code_set_one_sequence_and_the_sets_a_distribution(seed):
    """`model.visit_order: frequency`: the grammar admits one token order per code set, so the
    teacher-forced probability of a visit's codes in id order is the probability of its code set, and
    over all 31 non-empty sets of 5 codes they sum to 1 (an untrained model: nothing learned helps)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml")
    patients = [type("P", (), {"visits": [[f"C{i}"] for i in range(5)]})()]
    tok = DiagnosisCodeTokenizer.from_patients(patients, "frequency")
    assert tok.ordered
    torch.manual_seed(seed)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    history = [[tok.n_special + 1, tok.n_special + 3]]
    sets, p = set_probabilities(model, tok, history)
    assert len(sets) == 31 and p.min() > 0
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-4)
    # the same model read as unordered (any order allowed) spreads a set's mass over its orders: the
    # sorted sequences alone no longer hold it all
    tok.ordered = False
    model.grammar_ids["ordered"] = False
    _, p_any = set_probabilities(model, tok, history)
    assert float(p_any.sum()) < 0.9
