import numpy as np
import pytest
import torch

from promptehr.collator import TASK_ID, TASK_TYPES, EHRDataCollator, EHRPatientDataset, LengthBucketSampler, RowBucketSampler
from promptehr.schema import Patient
from promptehr.tokenizer import DiagnosisCodeTokenizer


@pytest.fixture(scope="module")
def setup(cohort):
    tok = DiagnosisCodeTokenizer.from_patients(cohort)
    ds = EHRPatientDataset(cohort, tok)
    return tok, ds


def batches(tok, ds, n_batches=30, batch_size=16, **kwargs):
    collator = EHRDataCollator(tok, seed=7, **kwargs)
    for b in range(n_batches):
        idx = range(b * batch_size, (b + 1) * batch_size)
        yield [ds[i] for i in idx], collator([ds[i] for i in idx])


def split_visits(tok, ids):
    out, cur = [], None
    for t in ids:
        if t == tok.visit_open_id:
            cur = []
        elif t == tok.visit_close_id:
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


def test_batch_keys_shapes_and_padding(setup):
    tok, ds = setup
    for _items, batch in batches(tok, ds, n_batches=5):
        n = batch["input_ids"].shape[0]
        assert set(batch) >= {"input_ids", "attention_mask", "labels", "x_num", "x_cat", "task_type", "target_mask"}
        assert batch["x_num"].shape == (n, 1) and batch["x_cat"].shape == (n, 1) and batch["task_type"].shape == (n,)
        lab, ids, att = batch["labels"], batch["input_ids"], batch["attention_mask"]
        # label padding is -100, never the pad id; input padding is pad with attention 0
        assert not (lab == tok.pad_token_id).any()
        lengths = (lab != -100).sum(1)
        assert lengths.max() == lab.shape[1]  # padded to the longest row, not a fixed size
        for r in range(n):
            assert (lab[r, lengths[r] :] == -100).all() and (lab[r, : lengths[r]] != -100).all()
            k = int(att[r].sum())
            assert (ids[r, k:] == tok.pad_token_id).all() and (ids[r, :k] != tok.pad_token_id).all()
        assert att.sum(1).max() == ids.shape[1]


def test_labels_are_the_clean_patient(setup):
    tok, ds = setup
    for items, batch in batches(tok, ds):
        r = 0
        for _, visits, age, sex in items:
            # the rows of one patient are consecutive; the first is its reconstruction/denoising row
            lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
            assert lab[-1] == tok.eos_token_id
            got = [sorted(v) for v in split_visits(tok, lab)]
            assert got == [sorted(v.tolist()) for v in visits]
            assert float(batch["x_num"][r, 0]) == pytest.approx(age) and int(batch["x_cat"][r, 0]) == sex
            r += 1
            while r < len(batch["task_type"]) and TASK_TYPES[batch["task_type"][r]] in (
                "next_visit_prediction",
                "first_visit",
            ):
                r += 1
        assert r == len(batch["task_type"])


def test_corrupted_rows_differ_and_replacements_are_codes(setup):
    tok, ds = setup
    n_denoise = n_recon = 0
    for _items, batch in batches(tok, ds):
        for r, task in enumerate(batch["task_type"].tolist()):
            enc = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
            lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
            if task == TASK_ID["denoising"]:
                n_denoise += 1
                assert enc[1:] != lab, "a corrupted row must not be a copy of its labels"
                # the encoder holds only codes from the vocabulary, delimiters and <mask>: never other specials
                specials = {t for t in enc if t < tok.n_special}
                assert specials <= {
                    tok.bos_token_id,
                    tok.eos_token_id,
                    tok.visit_open_id,
                    tok.visit_close_id,
                    tok.mask_token_id,
                }
                assert enc.count(tok.visit_open_id) == lab.count(tok.visit_open_id)
            elif task == TASK_ID["reconstruction"]:
                n_recon += 1
                assert enc[1:] == lab
    assert n_denoise > 50 and n_recon > 50  # corruption_prob 0.5 gives both kinds


def test_replacement_draws_codes_only(setup):
    tok, ds = setup
    # only replacement on: every changed position must hold a code, never a special token
    changed = 0
    for _items, batch in batches(
        tok, ds, corruption_prob=1.0, mask_probability=0.0, del_probability=0.0, rep_probability=0.5
    ):
        for r, task in enumerate(batch["task_type"].tolist()):
            if task != TASK_ID["denoising"]:
                continue
            enc = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()[1:]
            lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
            if tok.mask_token_id in enc:  # no code was drawn for replacement: a span was forced instead
                continue
            assert len(enc) == len(lab)
            for e, label in zip(enc, lab):
                if e != label:
                    changed += 1
                    assert e >= tok.n_special and label >= tok.n_special
    assert changed > 100


def test_next_visit_rows_hide_the_target_visit(setup):
    """A row hiding visit k: the encoder holds visits[:k] and a `<mask>` placeholder; the labels hold
    visits[:k + 1] and the token after visit k; target_mask marks visit k."""
    tok, ds = setup
    seen = 0
    for _items, batch in batches(tok, ds):
        patient = None  # a patient's rows are consecutive, its whole-patient row (clean labels) first
        for r, task in enumerate(batch["task_type"].tolist()):
            lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
            if task not in (TASK_ID["next_visit_prediction"], TASK_ID["first_visit"]):
                assert not batch["target_mask"][r].any()
                patient = split_visits(tok, lab)
                continue
            seen += 1
            enc = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
            enc_visits = split_visits(tok, enc)
            k = len(enc_visits) - 1
            assert (k >= 1) == (task == TASK_ID["next_visit_prediction"])
            # the encoder holds exactly the history and a placeholder visit with only <mask>
            assert enc_visits[:-1] == patient[:k] and enc_visits[-1] == [tok.mask_token_id]
            assert split_visits(tok, lab) == patient[: k + 1]
            target = patient[k]
            history_codes = {c for v in patient[:k] for c in v}
            assert not (set(target) - history_codes) & set(enc), "target codes leaked into the encoder"
            # target_mask marks exactly the target visit's codes
            marked = batch["labels"][r][batch["target_mask"][r]].tolist()
            assert marked == target
            # the token after the target visit says whether more visits follow
            assert lab[-1] == (tok.visit_open_id if k + 1 < len(patient) else tok.eos_token_id)
    assert seen > 30


def test_batches_are_reproducible_per_seed_and_epoch(setup):
    tok, ds = setup
    items = [ds[i] for i in range(16)]
    a, b = EHRDataCollator(tok, seed=1), EHRDataCollator(tok, seed=1)
    assert torch.equal(a(items)["input_ids"], b(items)["input_ids"])
    b.set_epoch(1)
    assert not torch.equal(a(items)["input_ids"], b(items)["input_ids"])


def test_span_infilling_uses_one_mask_per_span(setup):
    tok, ds = setup
    found = 0
    collator = EHRDataCollator(
        tok,
        seed=3,
        corruption_prob=1.0,
        mask_probability=1.0,
        del_probability=0.0,
        rep_probability=0.0,
        lambda_poisson=3.0,
        next_visit_rows=False,
        first_visit_prob=0.0,
    )
    batch = collator([ds[i] for i in range(64)])
    for r in range(batch["input_ids"].shape[0]):
        enc = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
        for ev, lv in zip(split_visits(tok, enc), split_visits(tok, lab)):
            assert ev.count(tok.mask_token_id) == 1  # every visit got exactly one span
            assert len(ev) - 1 <= len(lv)
            found += len(lv) - (len(ev) - 1)
    assert found > 0


def test_dataset_counts_unknown_codes_and_truncation():
    tok = DiagnosisCodeTokenizer(["A", "B", "C"])
    patients = [Patient("x", 40, "F", [["A", "Z"], ["B"], ["C", "A", "B"]])]
    ds = EHRPatientDataset(patients, tok, max_length=12)
    assert ds.report["unknown_codes"] == 1
    assert ds.report["visits_truncated"] == 1  # 2 + 4 + 3 + 5 = 14 tokens > 12: the earliest visit goes
    assert [v.tolist() for v in ds.visits[0]] == [[tok.encode_code("B")], [tok.encode_code(c) for c in "CAB"]]


def test_length_buckets_cover_every_patient_once(setup):
    tok, ds = setup
    sampler = LengthBucketSampler(ds.lengths, 16, seed=0, window=4)
    idx = [i for b in sampler for i in b]
    assert sorted(idx) == list(range(len(ds)))
    # within a batch lengths are close: padding waste is far below a random batching
    waste = np.mean([ds.lengths[b].max() - ds.lengths[b].mean() for b in sampler])
    rng = np.random.default_rng(0)
    rand = np.mean(
        [ds.lengths[b].max() - ds.lengths[b].mean() for b in np.array_split(rng.permutation(len(ds)), len(sampler))]
    )
    assert waste < rand / 2


def _row_batches(tok, ds, epoch=0, batch_size=16, seed=0):
    collator = EHRDataCollator(tok, seed=5)
    sampler = RowBucketSampler(ds, collator, batch_size, seed=seed)  # as train() builds it
    sampler.set_epoch(epoch)
    collator.set_epoch(epoch)
    plan = list(sampler)
    return sampler, plan, [collator([ds[item] for item in b]) for b in plan]


def test_row_buckets_build_every_planned_row_once_in_len_batches(setup):
    tok, ds = setup
    sampler, plan, batches = _row_batches(tok, ds)
    assert len(plan) == len(sampler) == -(-len(ds) // 16) and all(plan)
    items = [item for b in plan for item in b]
    assert sorted(item[3] for item in items) == list(range(len(items)))  # row ids unique
    # every patient gets its whole-patient row exactly once; next-visit rows only for 2+ visits, at most one
    per_patient = {}
    for i, task, k, _ in items:
        per_patient.setdefault(i, []).append((TASK_TYPES[task], k))
    assert sorted(per_patient) == list(range(len(ds)))
    for i, rows in per_patient.items():
        kinds = [t for t, _ in rows]
        assert sum(t in ("reconstruction", "denoising") for t in kinds) == 1
        assert kinds.count("next_visit_prediction") == (len(ds.visits[i]) >= 2)
        assert all(1 <= k < len(ds.visits[i]) for t, k in rows if t == "next_visit_prediction")
    # the collator built exactly the planned rows: task types, demographics, the hidden visit's codes
    for b, batch in zip(plan, batches):
        assert batch["task_type"].tolist() == [task for _, task, _, _ in b]
        assert batch["x_num"][:, 0].tolist() == pytest.approx([float(ds.ages[i]) for i, *_ in b])
        for r, (i, _task, k, _) in enumerate(b):
            lab = batch["labels"][r][batch["labels"][r] != -100].tolist()
            got = [sorted(v) for v in split_visits(tok, lab)]
            want = [sorted(v.tolist()) for v in ds.visits[i]]
            assert got == (want if k < 0 else want[: k + 1])


def test_row_buckets_pad_less_than_patient_buckets(setup):
    tok, ds = setup
    _, _, batches = _row_batches(tok, ds)
    collator = EHRDataCollator(tok, seed=5)
    patient_batches = [collator([ds[i] for i in b]) for b in LengthBucketSampler(ds.lengths, 16, seed=0, window=50)]

    def useful(bs, key):
        real = sum(int((b[key] != (-100 if key == "labels" else tok.pad_token_id)).sum()) for b in bs)
        return real / sum(b[key].numel() for b in bs)

    for key in ("input_ids", "labels"):
        assert useful(batches, key) > useful(patient_batches, key) + 0.05, key
        assert useful(batches, key) > 0.8, key


def test_row_buckets_are_reproducible_per_epoch(setup):
    tok, ds = setup
    _, plan_a, batches_a = _row_batches(tok, ds, epoch=2)
    _, plan_b, batches_b = _row_batches(tok, ds, epoch=2)
    assert plan_a == plan_b
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches_a, batches_b))
    _, plan_c, _ = _row_batches(tok, ds, epoch=3)
    assert plan_c != plan_a


@pytest.mark.parametrize("n_patients,batch_size", [(1, 1), (3, 2), (5, 64), (40, 1), (40, 7)])
def test_row_buckets_never_yield_an_empty_batch(cohort, n_patients, batch_size):
    tok = DiagnosisCodeTokenizer.from_patients(cohort)
    ds = EHRPatientDataset(cohort[:n_patients], tok)
    sampler = RowBucketSampler(ds, EHRDataCollator(tok), batch_size, window=2)
    plan = list(sampler)
    assert len(plan) == len(sampler) and all(len(b) > 0 for b in plan)
    assert sorted({i for b in plan for i, *_ in b}) == list(range(n_patients))
