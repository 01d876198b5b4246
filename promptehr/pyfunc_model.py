"""The registered model, as MLflow "models from code": `mlflow.pyfunc.load_model(uri).predict(df)`.

Input: a table with columns `age` and `sex` ("M"/"F"), optionally `n_visits` (generate exactly that
many visits; else the model decides) and `seed` (per-row). Params: temperature, top_k, top_p,
max_visits, seed. Output: one row per generated patient with its visits as JSON (lists of codes).
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
        n_visits = None
        if "n_visits" in df.columns and df["n_visits"].notna().all():
            n_visits = [int(v) for v in df["n_visits"]]
        seed = int(params.get("seed", 0))
        if "seed" in df.columns and df["seed"].notna().any():
            seed = int(df["seed"].dropna().iloc[0])
        patients = generate_patients(self.model, self.tokenizer, df["age"].astype(float).tolist(),
                                     df["sex"].astype(str).tolist(), sampling, seed=seed, n_visits=n_visits)
        return pd.DataFrame({
            "patient_id": [p.subject_id for p in patients],
            "age": [p.age for p in patients],
            "sex": [p.sex for p in patients],
            "n_visits": [len(p.visits) for p in patients],
            "visits": [json.dumps(p.visits) for p in patients],
        })


mlflow.models.set_model(PromptEHRModel())
