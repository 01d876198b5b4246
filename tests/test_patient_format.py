"""The patient format: row layout, padding, and one grammar in two forms (vectorised for teacher-forced
labels, step by step for sampling) that must agree."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from promptehr.collator import EHRDataCollator, EHRPatientDataset
from promptehr.data import split_patients
from promptehr.patient_format import (
    PREVIOUS_VISIT_WIDTH,
    VisitGrammar,
    grammar_mask,
    hidden_visit_row,
    pad_batch,
    row_lengths,
    whole_patient_row,
    with_closing_token,
)
from promptehr.tokenizer import DiagnosisCodeTokenizer


@pytest.fixture(scope="module", params=["random", "frequency"])
def split(cohort, request):
    """(tokenizer, training patients), for each visit order (`model.visit_order`)."""
    train, val = split_patients(cohort, 0.2, 0)
    return DiagnosisCodeTokenizer.from_patients(train, request.param), train


def loader(tok, patients, batch_size=32):
    return DataLoader(
        EHRPatientDataset(patients, tok), batch_size=batch_size, shuffle=False, collate_fn=EHRDataCollator(tok, seed=0)
    )


def test_rows_have_the_lengths_the_sampler_plans_with(split):
    tok, train = split
    ds = EHRPatientDataset(train[:50], tok)
    for visits in ds.visits:
        lengths = np.array([len(v) for v in visits])
        enc, labels = whole_patient_row(tok, visits)
        assert (len(enc), len(labels)) == row_lengths(lengths, -1)
        for k in range(len(visits)):
            enc, labels, start = hidden_visit_row(tok, visits, k)
            assert (len(enc), len(labels)) == row_lengths(lengths, k)
            assert labels[start - 1] == tok.visit_open_id and list(labels[start : start + len(visits[k])]) == list(visits[k])


def test_the_scored_positions_are_the_hidden_visit_and_its_close(split):
    tok, train = split
    visits = EHRPatientDataset(train[:1], tok).visits[0] + [np.array([tok.n_special + 1, tok.n_special + 2])]
    enc, labels, start = hidden_visit_row(tok, visits, len(visits) - 1)
    batch = pad_batch(tok, [enc], [labels], [start], [2], [50.0], [0])
    scored = torch.nonzero(with_closing_token(batch["target_mask"])[0]).flatten().tolist()
    assert scored == [start, start + 1, start + 2] and labels[start + 2] == tok.visit_close_id


def test_previous_visit_holds_the_codes_of_the_visit_before_the_hidden_one():
    """`pad_batch`'s previous_visit (the recurrence bonus's codes): visit k-1 of a next-visit row, nothing
    (`<pad>` only) for a first-visit row and for a whole-patient row, which hides no visit."""
    tok = DiagnosisCodeTokenizer([f"C{i:02d}" for i in range(30)])
    visits = [np.array(v) + tok.n_special for v in ([3, 1], [4, 5, 9], [2], [7, 8])]
    rows, expected = [], []
    for k in range(len(visits)):
        rows.append(hidden_visit_row(tok, visits, k))
        expected.append(sorted(visits[k - 1].tolist()) if k else [])
    enc, lab = whole_patient_row(tok, visits)
    rows.append((enc, lab, -1))
    expected.append([])
    batch = pad_batch(tok, *zip(*rows), [0] * len(rows), [50.0] * len(rows), [0] * len(rows))
    got = batch["previous_visit"]
    assert got.shape == (len(rows), PREVIOUS_VISIT_WIDTH)  # the longest, 3, rounded up
    for row, codes in zip(got.tolist(), expected):
        assert sorted(c for c in row if c != tok.pad_token_id) == codes
        assert all(c == tok.pad_token_id for c in row[len(codes) :])


def reference_grammar_mask(labels, tok, vocab):
    """The patient format's rules, one position at a time (what `grammar_mask` vectorises)."""
    out = torch.zeros((*labels.shape, vocab), dtype=torch.bool)
    for b, row in enumerate(labels.tolist()):
        inside, emitted = False, []
        for t, label in enumerate(row):
            allowed = set()
            if inside:
                allowed = set(range(tok.n_special, vocab)) - {c for c in emitted if c >= tok.n_special}
                if tok.ordered and emitted and emitted[-1] >= tok.n_special:  # only codes above the last one
                    allowed -= set(range(emitted[-1] + 1))
                if emitted:
                    allowed.add(tok.visit_close_id)
            else:
                allowed = {tok.visit_open_id, tok.eos_token_id}
            if label >= 0:
                allowed.add(label)
            else:
                allowed.add(tok.pad_token_id)
            out[b, t] = torch.tensor([v not in allowed for v in range(vocab)])
            if label == tok.visit_open_id:
                inside, emitted = True, []
            elif label == tok.visit_close_id:
                inside = False
            elif inside and label >= 0:
                emitted.append(label)
    return out


def test_grammar_mask_is_the_patient_format(split):
    tok, train = split
    batch = next(iter(loader(tok, train, batch_size=16)))
    labels = batch["labels"].clone()
    labels[0, 1] = tok.unk_token_id  # an unknown code in a visit: allowed as the label, counts as a code
    mask = grammar_mask(labels, tok, len(tok))
    assert torch.equal(mask, reference_grammar_mask(labels, tok, len(tok)))
    # the rules bite: repeats inside a visit and closing an empty visit are banned
    first_code = labels[:, 1]
    assert mask[:, 2].gather(1, first_code.unsqueeze(1)).all()
    assert mask[:, 1, tok.visit_close_id].all()
    if tok.ordered:  # rows write each visit in id order, and after code c every code up to c is banned
        pairs = (labels[:, :-1] >= tok.n_special) & (labels[:, 1:] >= tok.n_special)
        assert pairs.sum() > 50 and (labels[:, 1:] > labels[:, :-1])[pairs].all()
        for b, c in enumerate(first_code.tolist()):
            if c >= tok.n_special:
                assert mask[b, 2, tok.n_special : c + 1].all() and not mask[b, 2, c + 1 :].all()


def test_the_sampler_grammar_is_the_vectorised_grammar(split):
    """Feeding a label row's visits token by token through `VisitGrammar` bans, at every position
    inside a visit and at the token after it, exactly what `grammar_mask` bans there."""
    tok, train = split
    labels = next(iter(loader(tok, train, batch_size=16)))["labels"]
    mask = grammar_mask(labels, tok, len(tok))
    checked = 0
    for row, row_mask in zip(labels.tolist(), mask):
        row = [t for t in row if t >= 0]
        opens = [i for i, t in enumerate(row) if t == tok.visit_open_id]
        for i in opens:  # write each visit from its first position, revealing nothing
            if i + 1 == len(row):  # a next-visit row's labels end with the `<v>` of the visit after
                continue
            grammar = VisitGrammar.start(tok, [[]], len(tok), max_codes=40, device="cpu")
            t = i + 1
            while True:
                banned = grammar.banned()[0]
                allowed_label = banned.clone()
                allowed_label[row[t]] = False  # grammar_mask never bans the label itself
                assert torch.equal(allowed_label, row_mask[t]), (t, row[t])
                checked += 1
                grammar.advance(torch.tensor([row[t]]))
                if grammar.done[0] or t + 1 >= len(row):
                    break
                t += 1
    assert checked > 100


def test_an_ordered_visit_writes_its_revealed_codes_at_their_places():
    """Ordered vocabulary, revealed codes r1 < r2: the next code lies above the last one written and at
    or below the next revealed code; `</v>` waits for every revealed code; a revealed code written at its
    place is not a new code."""
    tok = DiagnosisCodeTokenizer([f"C{i:02d}" for i in range(12)], ordered=True)
    s, close = tok.n_special, tok.visit_close_id
    grammar = VisitGrammar.start(tok, [[s + 7, s + 3]], len(tok), max_codes=40, device="cpu")

    def allowed():
        return set(torch.nonzero(~grammar.banned()[0]).flatten().tolist())

    assert allowed() == set(range(s, s + 4))  # up to r1 = s + 3, no `</v>` yet
    assert grammar.advance(torch.tensor([s + 1])).tolist() == [True]
    assert allowed() == {s + 2, s + 3}
    assert grammar.advance(torch.tensor([s + 3])).tolist() == [False]  # r1: revealed, not new
    assert allowed() == set(range(s + 4, s + 8))
    grammar.advance(torch.tensor([s + 7]))
    assert allowed() == set(range(s + 8, s + 12)) | {close}  # every revealed code written: may close
    # a visit at max_codes must write its remaining revealed codes, then close
    grammar = VisitGrammar.start(tok, [[s + 9]], len(tok), max_codes=2, device="cpu")
    grammar.advance(torch.tensor([s + 2]))
    assert allowed() == {s + 9}
    grammar.advance(torch.tensor([s + 9]))
    assert allowed() == {close}


def test_the_ranking_mask_of_an_ordered_visit_bans_every_revealed_code():
    """`banned(ordered=False)` (what the ranked guess reads): every revealed code banned, the last id of
    the vocabulary included when another row reveals more codes (padding must not unban it)."""
    tok = DiagnosisCodeTokenizer([f"C{i:02d}" for i in range(12)], ordered=True)
    s, last = tok.n_special, len(tok) - 1
    grammar = VisitGrammar.start(tok, [[last], [last, s + 2, s + 4]], len(tok), max_codes=40, device="cpu")
    banned = grammar.banned(ordered=False)
    assert banned[0, last] and banned[1, [last, s + 2, s + 4]].all()
    assert not banned[0, s:last].any() and not banned[1, s + 3]
