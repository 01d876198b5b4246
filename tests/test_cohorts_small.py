"""The 389-code `small` cohort: the same seed gives byte-identical patients as before the cohorts
became a package (reference hashes computed on commit 54b9461, promptehr/cohort.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from promptehr.cohorts import cohort_model, sample_cohort


def digest(patients) -> str:
    rows = [[p.subject_id, p.age, p.sex, p.visits] for p in patients]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@pytest.mark.parametrize(
    "n, seed, expected",
    [
        (600, 3, "3665743172361dcfacfad86b4bc2e08be3ffd71c075b69aa9fe58c810f1a5807"),
        (2000, 7, "b2ce5fb6395325cda927b2aa8efcd55f1ac79bf3546148fab5399662eac3f7b2"),
        (5000, 123, "4ced26cf337249cb8122c2c506b683fb5eae36ed6fb699d3fe9238dafe4f8377"),
    ],
)
def test_small_cohort_is_byte_identical_to_the_pinned_one(n, seed, expected):
    assert digest(sample_cohort(n, seed=seed, generator="small")) == expected


def test_small_cohort_pinned_patients_states_and_likelihood():
    first = sample_cohort(5, seed=0, generator="small")
    assert first[1].age == 90.0 and first[1].sex == "F"
    assert first[1].visits[0] == ["4280", "2869", "2749", "78820", "42731", "5856", "E8788", "40390", "6202"]
    assert first[2].visits == [["V3001", "V3000", "7470", "7742", "V3101", "V290"]]
    model = cohort_model("small")
    assert len(model.codes) == 389
    patients, states = model.sample_with_states(1000, seed=11)
    assert (
        hashlib.sha256(json.dumps(states).encode()).hexdigest()
        == "8b51fb0bc527c2ff525cdc232851edbc83cf991b5aa785e01666206986ab6f21"
    )
    assert digest(patients) == "0e4196fb413b3746d7d342429a587431ff481f4dc964f754256cad9254343c1d"
    assert model.next_visit_log_probs(sample_cohort(50, seed=1, generator="small")[3])[0] == pytest.approx(
        -23.39727897, abs=1e-7
    )
