"""The registered model, as MLflow "models from code": `mlflow.pyfunc.load_model(uri).predict(df)`.

Input: a table with columns `age` and `sex` ("M"/"F"), optionally `n_visits` (generate exactly that
many visits; empty: the model decides) and `seed` (a row with a seed is generated on its own, so it
gets the same patient whatever else the request holds; the other rows are generated together with
the `seed` param). Params: temperature, top_k, top_p, max_visits, seed. Output: one row per input
row, in order, with the patient's visits as JSON (lists of codes).
This file is executed by MLflow when the model is loaded; it imports mlflow by necessity.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class PromptEHRModel(PythonModel):
    def load_context(self, context):
        from promptehr.checkpoint import load_checkpoint

        self.model, self.tokenizer, self.cfg, self.metadata = load_checkpoint(context.artifacts["checkpoint"], "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from promptehr.generate import SamplingConfig, generate_patients

        params = params or {}
        df = pd.DataFrame(model_input)
        missing = [c for c in ("age", "sex") if c not in df.columns]
        if missing:
            raise ValueError(f"predict() input lacks column(s) {missing}; it needs age and sex (M/F)")
        bad = sorted(set(df["sex"].astype(str)) - {"M", "F"})
        if bad:
            raise ValueError(f"predict() column sex must hold M or F, found {bad}")
        sampling = SamplingConfig(temperature=float(params.get("temperature", 1.0)), top_k=int(params.get("top_k", 0)),
                                  top_p=float(params.get("top_p", 1.0)), max_visits=int(params.get("max_visits", 20)))
        n_visits = [None] * len(df)
        if "n_visits" in df.columns:
            n_visits = [None if pd.isna(v) else int(v) for v in df["n_visits"]]
        row_seeds = [None] * len(df)
        if "seed" in df.columns:
            row_seeds = [None if pd.isna(v) else int(v) for v in df["seed"]]
        ages, sexes = df["age"].astype(float).tolist(), df["sex"].astype(str).tolist()
        patients = [None] * len(df)
        shared = [i for i, s in enumerate(row_seeds) if s is None]
        groups = [(shared, int(params.get("seed", 0)))] + [([i], s) for i, s in enumerate(row_seeds) if s is not None]
        for rows, seed in groups:
            if not rows:
                continue
            made = generate_patients(self.model, self.tokenizer, [ages[i] for i in rows], [sexes[i] for i in rows],
                                     sampling, seed=seed, n_visits=[n_visits[i] for i in rows])
            for i, p in zip(rows, made):
                patients[i] = p
        for i, p in enumerate(patients):
            p.subject_id = f"SYN{i + 1:07d}"
        return pd.DataFrame({
            "patient_id": [p.subject_id for p in patients],
            "age": [p.age for p in patients],
            "sex": [p.sex for p in patients],
            "n_visits": [len(p.visits) for p in patients],
            "visits": [json.dumps(p.visits) for p in patients],
        })


mlflow.models.set_model(PromptEHRModel())
