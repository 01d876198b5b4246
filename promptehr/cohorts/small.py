"""The `small` built-in cohort: 389 real ICD-9-CM codes, 9 hidden phenotype states (smoke tests).

A `CohortModel` (`promptehr.cohorts.hmm`) whose code tables are `tables/small_states.tsv` (per-state
Bernoulli probability of each code, plus a shared tail of comorbidities) and `tables/small_chronic.tsv`
(persistence of chronic codes); the state parameters and transitions are below.
"""

from __future__ import annotations

import numpy as np

from promptehr.cohorts.hmm import DEFAULT_MAX_VISITS, CohortModel
from promptehr.cohorts.icd9 import chronic_persistence, state_code_tables
from promptehr.validity import NEWBORN_AGE_LIMIT

OBSTETRIC_STATE_AGES = (15.0, 46.0)  # the obstetric state: women with 15 <= age < 46, inside the pregnancy rule's 12-55

STATE_NAMES = (
    "cardiometabolic",
    "heart_failure_renal",
    "pulmonary",
    "sepsis",
    "gi_liver",
    "oncology",
    "neuro_trauma",
    "obstetric",
    "neonatal",
)

# Per-state parameters, in STATE_NAMES order. The shared tail's codes (state "shared_tail" in the
# table) enter each state as p = 1 - (1 - p_state) * (1 - scale * p_shared).
#              init_logit  per-10y  male   min_age max_age sex   continue  shared-tail scale
STATE_PARAMS = {
    "cardiometabolic": (0.6, 0.15, 0.4, 1.0, 999.0, None, 0.20, 1.0),
    "heart_failure_renal": (0.0, 0.45, 0.0, 1.0, 999.0, None, 0.33, 1.0),
    "pulmonary": (0.0, 0.15, 0.0, 1.0, 999.0, None, 0.30, 1.0),
    "sepsis": (0.2, 0.15, 0.0, 1.0, 999.0, None, 0.20, 1.0),
    "gi_liver": (-0.3, -0.25, 0.3, 1.0, 999.0, None, 0.33, 1.0),
    "oncology": (-0.3, 0.0, 0.0, 1.0, 999.0, None, 0.30, 1.0),
    "neuro_trauma": (0.3, -0.10, 0.3, 1.0, 999.0, None, 0.12, 1.0),
    "obstetric": (0.8, 0.0, 0.0, OBSTETRIC_STATE_AGES[0], OBSTETRIC_STATE_AGES[1], "F", 0.06, 0.5),
    "neonatal": (0.0, 0.0, 0.0, 0.0, NEWBORN_AGE_LIMIT, None, 0.04, 0.0),
}

# Base visit-to-visit transitions (rows: from, columns: to; STATE_NAMES order; rows sum to 1).
# Sticky; cardiometabolic progresses to heart failure/renal; any state can be followed by sepsis,
# the least sticky state (an infection resolves; the underlying chronic phenotype comes back).
# Neonates stay neonatal (later visits of an age-0 patient are NICU readmissions).
TRANSITION = np.array(
    [
        # CM    HFR   PUL   SEP   GIL   ONC   NEU   OBS   NEO
        [0.72, 0.12, 0.03, 0.05, 0.02, 0.02, 0.04, 0.00, 0.00],  # cardiometabolic
        [0.04, 0.80, 0.04, 0.08, 0.01, 0.01, 0.02, 0.00, 0.00],  # heart_failure_renal
        [0.03, 0.06, 0.75, 0.10, 0.01, 0.03, 0.02, 0.00, 0.00],  # pulmonary
        [0.10, 0.12, 0.10, 0.45, 0.06, 0.06, 0.11, 0.00, 0.00],  # sepsis
        [0.02, 0.02, 0.02, 0.08, 0.80, 0.04, 0.02, 0.00, 0.00],  # gi_liver
        [0.01, 0.02, 0.04, 0.10, 0.03, 0.78, 0.02, 0.00, 0.00],  # oncology
        [0.06, 0.03, 0.03, 0.06, 0.02, 0.02, 0.78, 0.00, 0.00],  # neuro_trauma
        [0.02, 0.01, 0.01, 0.03, 0.02, 0.01, 0.05, 0.85, 0.00],  # obstetric
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 1.00],  # neonatal
    ]
)


def small_cohort_model() -> CohortModel:
    """The 389-code cohort model (a fresh object on every call)."""
    tables = state_code_tables(STATE_NAMES)
    state_tables = [tables[s] for s in STATE_NAMES]
    shared = tables["shared_tail"]
    codes = list(dict.fromkeys(code for table in [*state_tables, shared] for code in table))
    index = {c: i for i, c in enumerate(codes)}
    S, C = len(STATE_NAMES), len(codes)
    shared_vec = np.zeros(C)
    for code, p in shared.items():
        shared_vec[index[code]] = p
    code_prob = np.zeros((S, C))
    for s, name in enumerate(STATE_NAMES):
        own = np.zeros(C)
        for code, p in state_tables[s].items():
            own[index[code]] = p
        code_prob[s] = 1.0 - (1.0 - own) * (1.0 - STATE_PARAMS[name][7] * shared_vec)
    persistence = np.zeros(C)
    for code, rho in chronic_persistence().items():
        if code not in index:
            raise ValueError(f"tables/small_chronic.tsv: chronic code {code} is not in the vocabulary")
        persistence[index[code]] = rho
    params = [STATE_PARAMS[name] for name in STATE_NAMES]
    return CohortModel(
        codes=codes,
        state_names=list(STATE_NAMES),
        init_logit=np.array([p[0] for p in params]),
        init_logit_age=np.array([p[1] for p in params]),
        init_logit_male=np.array([p[2] for p in params]),
        state_min_age=np.array([p[3] for p in params]),
        state_max_age=np.array([p[4] for p in params]),
        state_sex=[p[5] for p in params],
        transition=TRANSITION.copy(),
        code_prob=code_prob,
        persistence=persistence,
        continue_prob=np.array([p[6] for p in params]),
        max_visits=DEFAULT_MAX_VISITS,
    )
