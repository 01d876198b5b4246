"""The built-in synthetic cohorts: generative patient models with an exact next-visit likelihood.

`data.synthetic.generator` names one of `GENERATORS`; `sample_cohort(n, seed, generator)` draws its
patients and `cohort_model(name)` returns the model itself (codes, `sample`, `next_visit_log_probs`),
the Bayes optimum bench/quality.py compares a trained model with.
"""

from __future__ import annotations

from collections.abc import Callable

from promptehr.cohorts.hmm import CohortModel
from promptehr.cohorts.mimic_hmm import mimic_hmm_model
from promptehr.cohorts.small import small_cohort_model
from promptehr.cohorts.transition import TransitionModel, transition_model
from promptehr.schema import DataError, Patient

GENERATORS: dict[str, Callable[[], CohortModel | TransitionModel]] = {
    "hmm": mimic_hmm_model,  # MIMIC-scale: ~9,000 ICD-9 codes, 31 hidden phenotype states
    "transition": transition_model,  # MIMIC-scale, same codes: sparse code-to-code transitions, no hidden state
    "small": small_cohort_model,  # 389 codes, 9 hidden states: smoke tests
}
DEFAULT_GENERATOR = "hmm"


def cohort_model(name: str = DEFAULT_GENERATOR):
    """A fresh model of the built-in cohort `name` (a key of `GENERATORS`)."""
    if name not in GENERATORS:
        raise DataError(f"data.synthetic.generator must be one of {', '.join(GENERATORS)}; got {name!r}")
    return GENERATORS[name]()


def cohort_model_for(data_cfg):
    """The model that generated the patients `data_cfg` (a DataConfig) loads: the built-in cohort of
    `data.synthetic.generator`; only `data.source=synthetic` has one."""
    if data_cfg.source != "synthetic":
        raise DataError(
            f"only the built-in cohort (data.source=synthetic) has an exact model; got data.source={data_cfg.source}"
        )
    return cohort_model(data_cfg.synthetic.generator)


def sample_cohort(n_patients: int, seed: int = 0, generator: str = DEFAULT_GENERATOR) -> list[Patient]:
    """`n_patients` patients of the built-in cohort `generator` (same seed -> same cohort)."""
    return cohort_model(generator).sample(n_patients, seed)
