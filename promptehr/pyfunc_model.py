"""The registered model, as MLflow "models from code": `mlflow.pyfunc.load_model(uri).predict(df)`.

Input: a table with columns `age` (a number, 0-90) and `sex` ("M"/"F"), optionally `n_visits` (that
many visits; empty: the model decides) and `seed` (a row with a seed gets the same patient whatever
else the request holds). Params: temperature, top_k, top_p, max_visits, seed. Output: one row per
input row, in order, visits as JSON. A request is checked whole first (one error lists every bad
value); rows are generated in chunks. MLflow executes this file on loading: it imports mlflow.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows generated and turned into output together (a multiple of the batch size)
BATCH_SIZE = 256  # patients per generation batch (generate_patients' batch_size)
OUTPUT_COLUMNS = ("patient_id", "age", "sex", "n_visits", "visits")


class PredictError(MlflowException):
    """An error whose `message` is what the caller gets: `mlflow models serve` answers an
    MlflowException with its error code's HTTP status and {"error_code", "message"} as the body.

    The scoring server rewrites `message` to "Failed to predict data '<the request as a table>'.
    Error: ..." before it answers; for a request of thousands of rows that prefix buries the line
    that matters, so the message set here stays as it was (the assignment is ignored)."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
        self._text = str(message)
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._text

    @message.setter
    def message(self, value) -> None:
        pass


# ------------------------------------------------------------------ checking a request

SEED_LIMIT = 2**53  # whole numbers below it are exact in a float column (and in JSON)


def _number(value):
    """float(value) for a real number (numpy's included, bool not), None for an empty cell; else
    raises TypeError."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError
    value = float(value)
    return None if math.isnan(value) else value


def _numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(the cells as float64, NaN where empty; mask of the cells that are not numbers). A numeric
    column is read as a whole; an object column (mixed JSON rows, strings) one cell at a time."""
    values = column.to_numpy()
    if values.dtype.kind in "iuf":
        return values.astype(np.float64, copy=False), np.zeros(len(values), dtype=bool)
    out, bad = np.full(len(values), np.nan), np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        try:
            number = _number(value)
        except TypeError:
            bad[i] = True
            continue
        if number is not None:
            out[i] = number
    return out, bad


def _show(value) -> str:
    try:
        if _number(value) is None:
            return "empty"
    except TypeError:
        pass
    return repr(value.item() if isinstance(value, np.generic) else value)


@dataclass
class Rows:
    """Rows [start, stop) of a request, read as arrays."""

    ages: np.ndarray  # float64
    sex_ids: np.ndarray  # index into promptehr.schema.SEXES (M 0, F 1)
    n_visits: np.ndarray  # float64; NaN: the model decides
    seeds: np.ndarray  # float64; NaN: the row has no seed of its own
    problems: list  # (row, column, value, rule) of every bad value


def read_rows(df: pd.DataFrame, start: int, stop: int, max_visits: int, max_age: float) -> Rows:
    part = df.iloc[start:stop]
    n = len(part)
    ages, bad_age = _numbers(part["age"])
    rules = {
        "age": f"must be a number within 0-{max_age:g}",
        "sex": "must be M or F",
        "n_visits": f"must be empty or a whole number within 1-{max_visits} (the max_visits param)",
        "seed": f"must be empty or a whole number within 0-{SEED_LIMIT - 1}",
    }
    with np.errstate(invalid="ignore"):
        bad = {
            "age": bad_age | ~((ages >= 0) & (ages <= max_age)),  # NaN fails both comparisons
            "sex": ~part["sex"].isin(["M", "F"]).to_numpy(dtype=bool),
        }
        whole = {}
        for column, low, high in (("n_visits", 1, max_visits), ("seed", 0, SEED_LIMIT - 1)):
            values, bad_number = _numbers(part[column]) if column in part.columns else (np.full(n, np.nan), False)
            ok = np.isnan(values) | ((values == np.floor(values)) & (values >= low) & (values <= high))
            bad[column], whole[column] = bad_number | ~ok, values
    problems = sorted(
        (start + row, column, _show(part[column].iloc[row]), rules[column])
        for column in rules
        for row in np.flatnonzero(bad[column])
    )
    return Rows(ages, (part["sex"] == "F").to_numpy(dtype=np.int8), whole["n_visits"], whole["seed"], problems)


def check_request(df: pd.DataFrame, max_visits: int, max_age: float) -> None:
    """Raise PredictError listing every bad value of the request (row, column, value, rule), so that
    nothing is generated for a request with a bad row. Read in chunks, as generation reads it."""
    missing = [c for c in ("age", "sex") if c not in df.columns]
    if missing:
        raise PredictError(
            f"predict() input lacks column(s) {missing}; it needs age and sex (M/F), optionally n_visits and seed"
        )
    problems = []
    for start in range(0, len(df), CHUNK_ROWS):
        problems += read_rows(df, start, start + CHUNK_ROWS, max_visits, max_age).problems
    if problems:
        order = {"age": 0, "sex": 1, "n_visits": 2, "seed": 3}
        problems.sort(key=lambda p: (p[0], order[p[1]]))
        raise PredictError(
            f"predict() refused the request: {len(problems)} bad value(s) in "
            f"{len({p[0] for p in problems})} of {len(df)} rows (rows count from 0); "
            "nothing was generated:\n"
            + "\n".join(f"row {row}, {column}: {value} ({rule})" for row, column, value, rule in problems)
        )


def sampling_from_params(params: dict):
    from promptehr.generate import SamplingConfig

    def get(name, kind, default):
        return default if params.get(name) is None else kind(params[name])

    try:
        return SamplingConfig(
            temperature=get("temperature", float, 1.0),
            top_k=get("top_k", int, 0),
            top_p=get("top_p", float, 1.0),
            max_visits=get("max_visits", int, 20),
        )
    except (TypeError, ValueError) as exc:
        raise PredictError(f"predict() refused the request: params: {exc}") from None


# ------------------------------------------------------------------ the model


class PromptEHRModel(PythonModel):
    def load_context(self, context):
        from promptehr.checkpoint import load_checkpoint

        self.model, self.tokenizer, self.cfg, self.metadata = load_checkpoint(context.artifacts["checkpoint"], "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from promptehr.schema import MAX_AGE

        params = params or {}
        sampling = sampling_from_params(params)
        seed = 0 if params.get("seed") is None else params["seed"]
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise PredictError(f"predict() refused the request: params: seed must be a whole number >= 0, got {seed!r}")
        df = pd.DataFrame(model_input)
        check_request(df, sampling.max_visits, MAX_AGE)
        try:
            return self._generate(df, sampling, int(seed))
        except ValueError as exc:  # a request the model cannot serve, e.g. n_visits beyond its positions
            raise PredictError(f"predict() could not generate the request: {exc}") from exc
        except Exception as exc:
            logger.exception("predict() failed")  # the trace goes to the server's log, not to the client
            raise PredictError(f"predict() failed: {type(exc).__name__}: {exc}", INTERNAL_ERROR) from exc

    def _generate(self, df: pd.DataFrame, sampling, seed: int) -> pd.DataFrame:
        """Generate a checked request CHUNK_ROWS rows at a time, each chunk turned into output columns
        before the next is read, so that memory beyond the output does not grow with the request. Rows
        without a seed of their own share one random stream (the `seed` param), continued from chunk
        to chunk; a row with a seed is generated alone."""
        import torch
        from tqdm.auto import tqdm

        from promptehr.generate import generate_patients
        from promptehr.schema import MAX_AGE

        n = len(df)
        out = {
            "patient_id": np.empty(n, dtype=object),
            "age": np.empty(n),
            "sex": np.empty(n, dtype=object),
            "n_visits": np.zeros(n, dtype=np.int64),
            "visits": np.empty(n, dtype=object),
        }
        stream = torch.Generator().manual_seed(seed)
        with tqdm(total=n, desc="predict", unit="patient", disable=n <= CHUNK_ROWS or None) as bar:
            for start in range(0, n, CHUNK_ROWS):
                rows = read_rows(df, start, start + CHUNK_ROWS, sampling.max_visits, MAX_AGE)
                own = ~np.isnan(rows.seeds)
                jobs = [(np.flatnonzero(~own), stream)] + [(np.array([i]), int(rows.seeds[i])) for i in np.flatnonzero(own)]
                for idx, rng in jobs:
                    if not len(idx):
                        continue
                    made = generate_patients(
                        self.model,
                        self.tokenizer,
                        rows.ages[idx].tolist(),
                        rows.sex_ids[idx].tolist(),
                        sampling,
                        seed=rng,
                        batch_size=BATCH_SIZE,
                        n_visits=[None if math.isnan(v) else int(v) for v in rows.n_visits[idx].tolist()],
                    )
                    for i, p in zip((start + idx).tolist(), made):
                        out["age"][i], out["sex"][i], out["n_visits"][i] = p.age, p.sex, len(p.visits)
                        out["patient_id"][i], out["visits"][i] = f"SYN{i + 1:07d}", json.dumps(p.visits)
                bar.update(len(rows.ages))
        # object columns as they are: inferring pandas' arrow-backed `str` would copy every string
        return pd.DataFrame({c: pd.Series(out[c], dtype=out[c].dtype, copy=False) for c in OUTPUT_COLUMNS})


mlflow.models.set_model(PromptEHRModel())
