"""The registered model as users call it: `mlflow.pyfunc.load_model(uri).predict` (schema enforced) and
`mlflow models serve`. Inputs people type (int or float ages, empty cells), one error listing every bad
row, the REST error body, chunked generation and its memory, a large request over REST."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from servers import clean_env, free_port, post_json, running, serve_command

from promptehr.checkpoint import save_checkpoint
from promptehr.config import load_config
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.tokenizer import DiagnosisCodeTokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder: Path, cohort, n_codes: int = 30, short_patients: bool = False, *overrides) -> Path:
    """An untrained experiments/tiny.yaml model. `short_patients`: its `</v>` and `</s>` logits are
    raised so that every patient is one visit of one code (a fast stand-in where a test is about
    handling rows, not about the model); n_visits still makes it write more visits."""
    cfg = load_config(ROOT / "experiments" / "tiny.yaml", list(overrides))
    tok = DiagnosisCodeTokenizer([f"C{i:04d}" for i in range(n_codes)])
    torch.manual_seed(0)
    model = PromptBartWithDemographicPrediction(tok, cfg).eval()
    if short_patients:
        with torch.no_grad():
            model.bart.final_logits_bias[0, [tok.visit_close_id, tok.eos_token_id]] = 50.0
    return save_checkpoint(folder, model, None, None, cfg, tok, {"demographics": demographics_histogram(cohort)})


def log_model(checkpoint: Path, tracking_uri: str) -> str:
    import mlflow

    from promptehr.registry import log_pyfunc_model

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)  # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to later tests
    experiment = client.get_experiment_by_name("serving-test")
    with mlflow.start_run(
        experiment_id=experiment.experiment_id if experiment else client.create_experiment("serving-test")
    ):
        return log_pyfunc_model(str(checkpoint), None).model_uri


@pytest.fixture(scope="module")
def logged(tmp_path_factory, cohort):
    """(tracking URI, URIs of logged tiny models: plain, short-patient, short-patient with 60 positions)."""
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    model_uri = log_model(tiny_checkpoint(tmp / "tiny", cohort), uri)
    short_uri = log_model(tiny_checkpoint(tmp / "short", cohort, 30, True), uri)
    cramped_uri = log_model(tiny_checkpoint(tmp / "cramped", cohort, 30, True, "model.max_position_embeddings=60"), uri)
    return uri, model_uri, short_uri, cramped_uri


@pytest.fixture(scope="module")
def loaded(logged):
    import mlflow

    mlflow.set_tracking_uri(logged[0])
    return tuple(mlflow.pyfunc.load_model(model_uri) for model_uri in logged[1:])


def test_predict_takes_int_and_float_ages_and_empty_cells(loaded):
    model = loaded[0]
    ints = model.predict(
        pd.DataFrame({"age": [70, 30, 4], "sex": ["M", "F", "F"], "n_visits": [2, None, 1]}),
        params={"seed": 1, "max_visits": 3},
    )
    assert list(ints["age"]) == [70.0, 30.0, 4.0] and list(ints["sex"]) == ["M", "F", "F"]
    assert ints["n_visits"][0] == 2 and ints["n_visits"][2] == 1 and 1 <= ints["n_visits"][1] <= 3
    assert [len(json.loads(v)) for v in ints["visits"]] == list(ints["n_visits"])
    floats = model.predict(
        pd.DataFrame({"age": [70.0, 30.5, 4.0], "sex": ["M", "F", "F"], "n_visits": [2, 3, 1]}), params={"seed": 1}
    )
    assert list(floats["n_visits"]) == [2, 3, 1]
    # a seed column with empty cells; the seeded row is the patient it is alone
    mixed = model.predict(pd.DataFrame({"age": [80, 30], "sex": ["M", "F"], "seed": [None, 7], "n_visits": [1, 2]}))
    alone = model.predict(pd.DataFrame({"age": [30], "sex": ["F"], "seed": [7], "n_visits": [2]}))
    assert mixed["visits"][1] == alone["visits"][0]
    empty = model.predict(pd.DataFrame({"age": pd.Series([], dtype=float), "sex": pd.Series([], dtype=str)}))
    assert len(empty) == 0 and list(empty.columns) == ["patient_id", "age", "sex", "n_visits", "visits"]


BAD = pd.DataFrame(
    {
        "age": [-5, 200, float("nan"), 30, 40, 50.5],
        "sex": ["M", "F", "X", "F", "m", "F"],
        "n_visits": [1, 2.5, None, 30, 0, 2],
        "seed": [None, -1, 3, 1.5, None, 4],
    }
)
BAD_LINES = [
    "row 0, age: -5.0 (must be a number within 0-90)",
    "row 1, age: 200.0 (must be a number within 0-90)",
    "row 1, n_visits: 2.5 (must be empty or a whole number within 1-20 (the max_visits param))",
    "row 1, seed: -1.0 (must be empty or a whole number within 0-9007199254740991)",
    "row 2, age: empty (must be a number within 0-90)",
    "row 2, sex: 'X' (must be M or F)",
    "row 3, n_visits: 30.0 (must be empty or a whole number within 1-20 (the max_visits param))",
    "row 3, seed: 1.5 (must be empty or a whole number within 0-9007199254740991)",
    "row 4, sex: 'm' (must be M or F)",
    "row 4, n_visits: 0.0 (must be empty or a whole number within 1-20 (the max_visits param))",
]
BAD_MESSAGE = (
    "predict() refused the request: 10 bad value(s) in 5 of 6 rows (rows count from 0); nothing was "
    "generated:\n" + "\n".join(BAD_LINES)
)


def test_a_request_with_bad_rows_is_refused_with_one_message_listing_each(loaded):
    model = loaded[0]
    with pytest.raises(MlflowException) as info:
        model.predict(BAD)
    assert info.value.message == BAD_MESSAGE
    assert info.value.error_code == "INVALID_PARAMETER_VALUE" and info.value.get_http_status_code() == 400
    # values that are not numbers at all (an object column, as mixed JSON rows give), bools, max_visits
    with pytest.raises(MlflowException) as info:
        model.predict(
            pd.DataFrame({"age": ["70", True, 3], "sex": ["F", "F", "M"], "n_visits": [None, 1, 4]}),
            params={"max_visits": 3},
        )
    assert info.value.message.splitlines()[1:] == [
        "row 0, age: '70' (must be a number within 0-90)",
        "row 1, age: True (must be a number within 0-90)",
        "row 2, n_visits: 4.0 (must be empty or a whole number within 1-3 (the max_visits param))",
    ]
    with pytest.raises(MlflowException, match=r"params: temperature must be > 0"):
        model.predict(pd.DataFrame({"age": [3], "sex": ["M"]}), params={"temperature": 0.0})


def test_a_request_the_model_cannot_generate_is_a_400_not_a_trace(loaded):
    """20 visits do not fit in 60 positions (a next visit needs 46 besides the history)."""
    cramped = loaded[2]
    assert len(cramped.predict(pd.DataFrame({"age": [50], "sex": ["F"], "n_visits": [4]}))) == 1
    with pytest.raises(MlflowException) as info:
        cramped.predict(pd.DataFrame({"age": [50], "sex": ["F"], "n_visits": [20]}), params={"seed": 1})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert info.value.message.startswith("predict() could not generate the request: patient 0:")
    assert "Traceback" not in info.value.message


def test_chunked_predict_gives_the_patients_of_one_uninterrupted_generation(loaded, logged, tmp_path):
    """2,500 rows: three chunks of generation continue one random stream, so the patients are those
    generate_patients gives for all rows at once (a chunk that restarted the stream would repeat
    the first chunk's patients)."""
    from promptehr.checkpoint import load_checkpoint
    from promptehr.registry import download_model_checkpoint

    short = loaded[1]
    n = 2500
    ages, sexes = [float(a) for a in np.resize([70, 30, 4, 55, 81], n)], list(np.resize(["M", "F", "F"], n))
    out = short.predict(pd.DataFrame({"age": ages, "sex": sexes}), params={"seed": 3})
    folder = download_model_checkpoint(logged[2], str(tmp_path), logged[0])
    assert not (folder / "training_state.pt").exists()  # the logged model carries what generation loads, no more
    model, tok, _, _ = load_checkpoint(folder)
    direct = generate_patients(model, tok, ages, sexes, SamplingConfig(), seed=3)
    assert list(out["visits"]) == [json.dumps(p.visits) for p in direct]
    assert list(out["patient_id"][[0, n - 1]]) == ["SYN0000001", f"SYN{n:07d}"]


MEMORY_SCRIPT = """
import json, os, sys, threading, time
import mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
n = int(sys.argv[3])
df = pd.DataFrame({"age": np.resize([70, 30, 4, 55], n), "sex": np.resize(["M", "F", "F", "M"], n)})
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
base = rss()
peak, done = [base], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.01)
watcher = threading.Thread(target=watch)
watcher.start()
out = model.predict(df, params={"seed": 1})
done.set()
watcher.join()
peak[0] = max(peak[0], rss())
print(json.dumps({"rows": len(out), "peak": peak[0] - base, "output": int(out.memory_usage(deep=True).sum())}))
"""


@pytest.mark.slow
def test_predict_memory_beyond_the_output_does_not_grow_with_the_request(cohort, tmp_path):
    """Peak resident memory during predict(), the output's own size taken off, at 100,000 rows is
    within 1.5x of that at 10,000 (each in a fresh process, no warm-up: both include the first
    chunk's working set). The model has the tiny config's shape and a vocabulary of 1,000 codes,
    its patients one code long so that 110,000 rows take a few minutes on 2 cores."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_uri = log_model(tiny_checkpoint(tmp_path / "short", cohort, n_codes=1000, short_patients=True), uri)
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    beyond = {}
    for n in (10_000, 100_000):
        proc = subprocess.run(
            [sys.executable, str(script), uri, model_uri, str(n)],
            env=clean_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        assert measured["rows"] == n
        beyond[n] = measured["peak"] - measured["output"]
    assert beyond[100_000] <= 1.5 * beyond[10_000], beyond


@pytest.mark.slow
def test_rest_server_answers_bad_rows_with_the_message_and_a_large_request_with_200(logged, tmp_path):
    """`mlflow models serve` as the README starts it (request timeout `-t 600`): bad rows -> 400 whose
    body holds the one message and no trace; 20,000 rows -> 200 with 20,000 patients."""
    uri, _, short_uri, _ = logged
    port = free_port()
    cmd = serve_command(short_uri, port)
    with running(
        cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=uri)
    ):
        url = f"http://127.0.0.1:{port}/invocations"
        rows = json.loads(BAD.to_json(orient="split", index=False))
        status, body = post_json(url, json.dumps({"dataframe_split": rows}).encode())
        assert status == 400, body[:2000]
        answer = json.loads(body)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and answer["message"] == BAD_MESSAGE
        assert "stack_trace" not in answer and b"Traceback" not in body
        n = 20_000
        data = [[int(a), s] for a, s in zip(np.resize([70, 30, 4, 55], n), np.resize(["M", "F", "F"], n))]
        status, body = post_json(
            url,
            json.dumps({"dataframe_split": {"columns": ["age", "sex"], "data": data}, "params": {"seed": 1}}).encode(),
            timeout=900,
        )
        assert status == 200, body[:2000]
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == n and predictions[-1]["patient_id"] == f"SYN{n:07d}"
        assert all(p["n_visits"] == len(json.loads(p["visits"])) == 1 for p in predictions)
