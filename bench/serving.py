"""The registered model's speed as users call it (a benchmark that prints figures): patients/s of
`mlflow.pyfunc.load_model(uri).predict` in process and of `mlflow models serve` over REST.

    python bench/serving.py                                          # base shape, trained 300 steps
    python bench/serving.py --checkpoint checkpoints/<run>/best_model --rows 2000

The checkpoint (by default the base config trained briefly, as bench/generation.py does, so that
patients have realistic lengths) is logged as the pyfunc model to a temporary SQLite store, then one
request of `--rows` rows (demographics from the checkpoint's histogram, ages as whole years) is
timed in process and sent to a server started as the README says (`-t 600`), after one small
warm-up request each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

from generation import build_checkpoint  # bench/generation.py, beside this script

from promptehr.checkpoint import read_metadata
from promptehr.cli import setup_logging
from promptehr.generate import sample_demographics

ROOT = Path(__file__).resolve().parents[1]


def _load_test_helpers():
    """tests/servers.py, the test suite's helpers that start a server and stop its whole process group."""
    spec = importlib.util.spec_from_file_location("servers", ROOT / "tests" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


servers = _load_test_helpers()
clean_env, free_port, post_json, running = servers.clean_env, servers.free_port, servers.post_json, servers.running
serve_command = servers.serve_command

logger = logging.getLogger("bench.serving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: train the base shape briefly)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    setup_logging("INFO")

    import mlflow
    import pandas as pd

    from promptehr.registry import log_pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint("base", args.train_steps, False, tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            model_uri = log_pyfunc_model(str(checkpoint), None).model_uri
        ages, sexes = sample_demographics(read_metadata(checkpoint)["demographics"], args.rows, seed=0)
        df = pd.DataFrame({"age": [int(a) for a in ages], "sex": sexes})
        model = mlflow.pyfunc.load_model(model_uri)
        model.predict(df.head(64), params={"seed": 1})
        start = time.perf_counter()
        out = model.predict(df, params={"seed": 1})
        in_process = time.perf_counter() - start
        visits = out["n_visits"].mean()

        port = free_port()
        cmd = serve_command(model_uri, port)
        url = f"http://127.0.0.1:{port}/invocations"
        body = json.dumps({"dataframe_split": json.loads(df.to_json(orient="split", index=False)), "params": {"seed": 1}})
        with running(
            cmd, f"http://127.0.0.1:{port}/ping", tmp / "serve.log", cwd=tmp, env=clean_env(MLFLOW_TRACKING_URI=uri)
        ):
            post_json(
                url, json.dumps({"dataframe_split": json.loads(df.head(64).to_json(orient="split", index=False))}).encode()
            )
            start = time.perf_counter()
            status, answer = post_json(url, body.encode(), timeout=3600)
            rest = time.perf_counter() - start
        if status != 200:
            raise SystemExit(f"REST request failed with HTTP {status}: {answer[:1000]!r}")
        print(
            f"{args.rows} rows, {visits:.2f} visits per patient: in process {args.rows / in_process:.0f} patients/s "
            f"({in_process:.1f} s), over REST {args.rows / rest:.0f} patients/s ({rest:.1f} s)"
        )


if __name__ == "__main__":
    main()
