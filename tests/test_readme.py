"""The README is tested: every code block is run here on the tiny config or marked as not runnable
(tests/readme.py has the marker syntax), and the commands run as a user would type them, from a
folder of their own, with MLflow's default store (./mlflow.db) and no MLFLOW_* variable set."""

import json
import re
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import readme
from servers import clean_env, free_port, post_json, running

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PROJECT_FILES = ("MLproject", "conda.yaml", "pyproject.toml", "experiments", "promptehr", "tuning")


# ------------------------------------------------------------------ every block is run or marked


def test_every_readme_block_is_run_by_a_test_or_marked_as_not_runnable():
    found = readme.blocks()
    unmarked = [f"README.md line {b.line}: {b.text.splitlines()[0][:60]!r}" for b in found if not (b.test or b.reason)]
    assert not unmarked, (
        "blocks without a `<!-- readme: test NAME -->` or `<!-- readme: not run: REASON -->` "
        f"line right before them: {unmarked}"
    )
    names = [b.test for b in found if b.test]
    assert len(names) == len(set(names)), f"a test name marks two blocks: {names}"
    used = set()
    for path in TESTS.glob("test_*.py"):
        used |= set(re.findall(r"readme\.(?:block|commands)\(\s*\"([\w-]+)\"", path.read_text()))
    assert set(names) == used, (
        f"blocks marked for a test that no test reads: {sorted(set(names) - used)}; "
        f"tests reading blocks that are not there: {sorted(used - set(names))}"
    )
    in_blocks = "\n".join(b.text for b in found)
    loose = [c for c in readme.inline_commands() if c not in in_blocks]
    assert not loose, f"commands in the README's prose that no block holds (put them in a marked block): {loose}"


def test_the_readme_checker_catches_an_unmarked_block_and_a_loose_command():
    text = "intro\n\n```bash\nmlflow run . -P epochs=3\n```\n\nRun `python tuning/search.py --n-trials 9` too.\n"
    [found] = readme.blocks(text)
    assert found.test is None and found.reason is None
    assert readme.inline_commands(text) == ["python tuning/search.py --n-trials 9"]
    marked = text.replace("```bash", "<!-- readme: not run: needs a cluster -->\n```bash")
    assert readme.blocks(marked)[0].reason == "needs a cluster"


# ------------------------------------------------------------------ predict(), in the default suite


@pytest.fixture
def champion(tmp_path, cohort):
    """A tiny model registered as `promptehr@champion` in a fresh store (returns its tracking URI)."""
    from mlflow import MlflowClient
    from test_serving import tiny_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(
        experiment_id=MlflowClient(uri).create_experiment("readme")
    ):  # no set_experiment: see test_serving
        from promptehr.registry import log_pyfunc_model

        info = log_pyfunc_model(str(tiny_checkpoint(tmp_path / "ck", cohort)), "promptehr")
    MlflowClient(uri).set_registered_model_alias("promptehr", "champion", info.registered_model_version)
    yield uri
    mlflow.set_tracking_uri(previous)


def test_readme_predict_example_runs_verbatim(champion):
    code = readme.block("predict").text
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    patients = namespace["patients"]
    assert isinstance(patients, pd.DataFrame) and list(patients.columns) == [
        "patient_id",
        "age",
        "sex",
        "n_visits",
        "visits",
    ]
    assert list(patients["age"]) == [70.0, 30.0, 4.0] and list(patients["sex"]) == ["M", "F", "F"]
    assert patients["n_visits"][0] == 2 and patients["n_visits"][2] == 1 and patients["n_visits"][1] >= 1
    assert [len(json.loads(v)) for v in patients["visits"]] == list(patients["n_visits"])


# ------------------------------------------------------------------ the commands, on the tiny config

SMALL = [  # the only changes made to a README command: the tiny config and small counts
    (r"experiments/base\.yaml", "experiments/tiny.yaml"),
    (r"-P epochs=\d+", "-P epochs=1"),
    (r"training\.num_epochs=\d+", "training.num_epochs=1"),
    (r"--n-trials \d+", "--n-trials 2"),
    (r"-P n_trials=\d+", "-P n_trials=2"),
    (r"--n-patients \d+", "--n-patients 20"),
    (r"-P n_patients=\d+", "-P n_patients=20"),
    (r"--n-workers \d+", "--n-workers 2"),
]


def tiny(command: str) -> str:
    for pattern, replacement in SMALL:
        command = re.sub(pattern, replacement, command)
    # commands that use the default config (experiments/base.yaml) are given the tiny one
    if re.match(r"mlflow run \.(?! -e (generate|evaluate))", command) and "config=" not in command:
        command += " -P config=experiments/tiny.yaml"
    if command.startswith("python tuning/search.py") and "--config" not in command:
        command += " --config experiments/tiny.yaml"
    return command


class Sandbox:
    """A user's working folder: the project's files linked in, runs in ./mlflow.db."""

    def __init__(self, folder: Path):
        self.folder = folder
        for name in PROJECT_FILES:
            (folder / name).symlink_to(ROOT / name)
        self.env = clean_env(PYTHONPATH=str(ROOT))
        self.uri = f"sqlite:///{folder / 'mlflow.db'}"

    def run(self, command: str, timeout: float = 900) -> str:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
        return proc.stdout

    def client(self):
        return mlflow.MlflowClient(self.uri)

    def runs(self):
        client = self.client()
        return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])

    def run_id_with_checkpoint(self) -> str:
        for run in self.runs():
            if (self.folder / "checkpoints" / run.info.run_id / "best_model").exists():
                return run.info.run_id
        raise AssertionError("no run has a checkpoint folder")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The Training block run in a fresh folder (its four commands, the tiny config)."""
    box = Sandbox(tmp_path_factory.mktemp("user"))
    for command in readme.commands("training"):
        box.run(tiny(command))
    return box


@pytest.mark.slow
def test_readme_training_commands(sandbox):
    runs = sandbox.runs()
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.experiment_id for r in runs} == {"0"}
    for run in runs:
        assert "val/loss" in run.data.metrics and run.inputs.dataset_inputs[0].dataset.name.startswith("synthetic")
    assert [r.data.params["training.batch_size"] for r in runs] == ["16", "16", "16", "32"]
    assert runs[2].data.params["collator.corruption_prob"] == "0.3"
    assert sandbox.client().get_model_version_by_alias("promptehr", "champion")


@pytest.mark.slow
def test_readme_resume_command(sandbox):
    first = sandbox.runs()[0]  # `mlflow run -P epochs=1`: resumed with the config's two epochs
    assert first.data.params["training.num_epochs"] == "1"
    [command] = readme.commands("resume")
    sandbox.run(tiny(command).replace("<run id>", first.info.run_id))
    steps = {m.step for m in sandbox.client().get_metric_history(first.info.run_id, "val/loss")}
    assert len(steps) == 2  # the second epoch's validation landed in the same run
    assert len(sandbox.runs()) == 4  # no new run


@pytest.mark.slow
def test_readme_generate_commands(sandbox):
    run_id = sandbox.run_id_with_checkpoint()
    for command in readme.commands("generate"):
        sandbox.run(tiny(command).replace("<run id>", run_id))
    out = sandbox.folder / "outputs" / "synthetic"
    [run] = [r for r in sandbox.runs() if r.data.tags.get("mlflow.project.entryPoint") == "generate"]
    assert run.data.tags["task"] == "generate" and run.data.metrics["gen/n_patients"] == 20  # not an empty run
    assert len(pd.read_csv(out / "PATIENTS.csv")) == 20
    assert len((out / "patients.jsonl").read_text().splitlines()) == 20


@pytest.mark.slow
def test_readme_serve_and_curl_commands(sandbox):
    serve, curl = readme.commands("serve")
    port = str(free_port())
    with running(
        serve.replace("5001", port),
        f"http://127.0.0.1:{port}/ping",
        sandbox.folder / "serve.log",
        cwd=sandbox.folder,
        env=sandbox.env,
    ):
        answer = json.loads(sandbox.run(curl.replace("5001", port)))
    rows = answer["predictions"]
    assert [r["sex"] for r in rows] == ["M", "F"] and [r["age"] for r in rows] == [70.0, 30.5]
    assert rows[0]["n_visits"] == 2 and all(len(json.loads(r["visits"])) == r["n_visits"] for r in rows)


@pytest.mark.slow
def test_readme_quality_commands(sandbox):
    run_id = sandbox.run_id_with_checkpoint()
    for command in readme.commands("quality"):
        sandbox.run(tiny(command).replace("<run id>", run_id))
    reports = [r for r in sandbox.runs() if r.data.tags.get("task") == "quality_report"]
    assert len(reports) == 2 and {r.info.experiment_id for r in reports} == {"0"}
    assert all(r.inputs.dataset_inputs[0].tags[0].value == "evaluation" for r in reports)
    assert json.loads((sandbox.folder / "outputs" / "quality" / "quality.json").read_text())["metrics"]["n_patients"] == 20


@pytest.mark.slow
def test_readme_ui_command_serves_the_experiment_the_readme_links(sandbox):
    [command] = readme.commands("ui")
    experiment = re.search(r"http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs", readme.README.read_text())[1]
    port = str(free_port())
    with running(
        command.replace("5000", port),
        f"http://127.0.0.1:{port}/health",
        sandbox.folder / "ui.log",
        cwd=sandbox.folder,
        env=sandbox.env,
    ):
        status, page = post_json(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            json.dumps({"experiment_ids": [experiment], "max_results": 1000}).encode(),
        )
    assert status == 200
    names = {r["info"]["run_id"] for r in json.loads(page)["runs"]}
    assert {r.info.run_id for r in sandbox.runs()[:4]} <= names  # the Training block's runs are where the link points


@pytest.mark.slow
def test_readme_search_commands_put_studies_beside_the_main_job(sandbox):
    for command in readme.commands("search"):
        sandbox.run(tiny(command), timeout=1800)
    runs = sandbox.runs()
    studies = [r for r in runs if r.data.tags.get("optuna.role") == "study"]
    assert len(studies) == 4 and {r.info.status for r in studies} == {"FINISHED"}
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    assert all(len(children.get(s.info.run_id, [])) == 2 for s in studies)
    # the main job, the CLI runs and every study side by side in one experiment, and no empty run
    assert {r.info.experiment_id for r in runs} == {"0"}
    assert all(r.data.metrics or r.info.run_id in children for r in runs)


@pytest.mark.slow
def test_readme_command_line_block(tmp_path):
    """The one command line as the Layout section writes it: its help, a train, a tune and a benchmark,
    each through the installed `promptehr` command, in a user's folder of its own."""
    import optuna

    box = Sandbox(tmp_path)
    help_command, train, tune, bench = readme.commands("command-line")
    assert all(f"{name} " in box.run(help_command) for name in ("train", "generate", "evaluate", "tune", "bench"))
    box.run(tiny(train))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()][0].startswith("untracked-")
    box.run(tiny(tune))
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert "small: 389 codes in the vocabulary; 5000 patients" in box.run(tiny(bench))
