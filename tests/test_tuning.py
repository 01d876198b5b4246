"""Hyperparameter search (promptehr/tuning/): space, trial budget, storages, pruning, and real studies.

Default suite: the space and budget logic, a pruned and a failed trial in-process, and
`python tuning/search.py` end to end on SQLite (3 tiny trials, then a resume). Marked slow+services:
3 local workers on a real PostgreSQL server logging to a real `mlflow server`, a worker killed with
SIGKILL mid-trial (heartbeats re-queue its trial, its MLflow run is closed), and the Slurm job array
on a real single-node Slurm (slurmctld + slurmd + munge on loopback). The servers: tests/services.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from services import clean_env, wait_for

from promptehr.config import load_config
from promptehr.tuning.space import default_params, load_space, suggest, trial_config
from promptehr.tuning.storage import describe, journal_path, normalize_url, open_storage
from promptehr.tuning.study import TrialBudget, init_study, run_worker, settings_from_config

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "tuning" / "search.py"
TINY = ROOT / "experiments" / "tiny.yaml"


def tiny_overrides(tmp_path, *extra) -> str:
    """The tiny config at its fastest: 150 patients, 2 epochs, no Jaccard, no samples, no quality report."""
    return " ".join(
        [
            "data.synthetic.n_patients=150",
            "training.num_epochs=2",
            "validation.jaccard_patients=0",
            "tracking.n_sample_patients=0",
            "training.quality_report=false",
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}",
            *extra,
        ]
    )


def search(*args, env, cwd, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SEARCH), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def child_runs(client, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


# ------------------------------------------------------------------ space, budget, storages (fast)


def test_space_is_the_seed_table_and_defaults_are_enqueued_when_in_range():
    space = load_space()
    assert space == {
        "training.learning_rate": {"low": 5e-5, "high": 2e-4, "log": True},
        "model.age_loss_weight": {"low": 1e-4, "high": 1e-2, "log": True},
        "model.sex_loss_weight": {"low": 1e-4, "high": 1e-2, "log": True},
        "collator.corruption_prob": {"low": 0.3, "high": 0.7},
        "collator.lambda_poisson": {"low": 2.0, "high": 5.0},
    }
    # base.yaml's small-model learning rate (1.5e-3) is outside the seed's range: that key is sampled
    cfg = load_config(ROOT / "experiments" / "base.yaml")
    assert default_params(cfg, space) == {
        "model.age_loss_weight": 1e-3,
        "model.sex_loss_weight": 1e-3,
        "collator.corruption_prob": 0.5,
        "collator.lambda_poisson": 3.0,
    }
    cfg = load_config(None, ["training.learning_rate=1e-4"])
    assert default_params(cfg, space)["training.learning_rate"] == 1e-4
    # a trial's values land on the config keys they name, nothing else changes
    values = suggest(optuna.trial.FixedTrial({**default_params(cfg, space), "training.learning_rate": 7e-5}), space)
    trial_cfg = trial_config(settings_from_config(cfg, space).base_config, values)
    assert trial_cfg.training.learning_rate == 7e-5 and trial_cfg.collator.lambda_poisson == 3.0
    assert trial_cfg.model == cfg.model and trial_cfg.data == cfg.data


def test_space_rejects_unknown_keys_and_bad_ranges(tmp_path):
    from promptehr.config import ConfigError

    for text, message in (
        ("training.lr: {low: 1.0e-5, high: 1.0e-4}", "not a config key"),
        ("training.learning_rate: {low: 0.0, high: 1.0e-4, log: true}", "0 < low < high"),
        ("training.precision: {type: categorical}", "choices"),
    ):
        path = tmp_path / "space.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_space(path)


def test_storage_urls(tmp_path):
    assert journal_path("journal:./optuna_journal.log") == "./optuna_journal.log"
    assert journal_path("/shared/study.log") == "/shared/study.log"
    assert journal_path("sqlite:///optuna.db") is None
    assert normalize_url("postgresql://u:p@h/db") == "postgresql+psycopg2://u:p@h/db"  # psycopg 3 is not installed
    assert "secret" not in describe("postgresql+psycopg2://user:secret@db-host:5432/optuna")
    journal = open_storage(f"journal:{tmp_path / 'j.log'}")
    assert isinstance(journal, optuna.storages.JournalStorage)
    rdb = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=5, grace_period=10)
    assert rdb.get_heartbeat_interval() == 5 and rdb.get_heartbeat_stale_trial_callback() is not None


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_trial_budget_holds_slots_across_workers():
    """N slots: running and waiting trials hold one; a stale trial's retry takes over its slot; a trial
    created after the last slot was taken is refused (MaxTrialsCallback would let K workers overshoot)."""
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        study.add_trial(
            optuna.create_trial(
                state=state,
                params={"x": 0.5},
                distributions=dist,
                value=1.0 if state == TrialState.COMPLETE else None,
                intermediate_values={1: 1.0},
            )
        )
    budget = TrialBudget(3)
    assert not budget.has_work(study)  # trial 2 is still running somewhere
    assert budget.admits(study, 2) and not budget.admits(study, 3)
    assert len(budget.finished(study)) == 2
    # trial 2's worker died: it fails and is re-queued with the same parameters
    study._storage.set_trial_state_values(study.trials[2]._trial_id, TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[2])
    retry = study.trials[3]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.5}
    assert budget.has_work(study) and budget.admits(study, 3)
    assert [t.number for t in budget.finished(study)] == [0, 1]
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs={"over_budget": True}))
    assert [t.number for t in TrialBudget.counted(study.trials)] == [0, 1, 3]


def test_local_workers_are_pinned_to_gpus_round_robin(monkeypatch):
    import torch

    from promptehr.cli import build_parser
    from promptehr.tuning import search as search_script

    started = []

    class Worker:
        def __init__(self, cmd, env):
            started.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(search_script.subprocess, "Popen", Worker)
    monkeypatch.setenv("MLFLOW_RUN_ID", "run-of-mlflow-run")  # workers must open child runs, not resume it
    args = build_parser().parse_args(["tune", "run", "--n-workers", "3", "--storage", "journal:study.log"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this job was given GPUs 4 and 6
    assert search_script.run_local_workers(args) == 0
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["4", "6", "4"]
    assert [cmd[cmd.index("--worker-id") + 1] for cmd, _ in started] == ["0", "1", "2"]
    assert all(
        cmd[1:4] == ["-m", "promptehr.cli", "--log-level"]
        and cmd[cmd.index("tune") + 1] == "worker"
        and "MLFLOW_RUN_ID" not in env
        for cmd, env in started
    )
    started.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert search_script.run_local_workers(args) == 0
    assert all("CUDA_VISIBLE_DEVICES" not in env and int(env["OMP_NUM_THREADS"]) >= 1 for _, env in started)


# ------------------------------------------------------------------ in-process: pruning and failures


def test_pruned_trial_ends_its_run_killed_and_a_failing_trial_failed(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store (./mlruns)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TINY, tiny_overrides(tmp_path, f"tracking.tracking_uri={uri}").split())
    space = {"training.precision": {"type": "categorical", "choices": ["fp32", "fp16"]}}  # fp16 is refused by train()
    storage = open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")  # several processes on one machine
    study = init_study(storage, "prune", settings_from_config(cfg, space, n_trials=2, pruner="none"))
    study.enqueue_trial({"training.precision": "fp16"})
    # a pruner that prunes at the first report: trial 0 (the defaults, fp32) stops after epoch 1
    study = optuna.load_study(study_name="prune", storage=storage, pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    from promptehr.tuning.objective import Objective

    assert run_worker(study, Objective(study)) == 2
    assert run_worker(study, Objective(study)) == 0  # the budget is spent
    pruned, failed = study.trials
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    assert failed.state == TrialState.FAIL and "fp16" in failed.user_attrs["failure_reason"]
    client = mlflow.MlflowClient(uri)
    killed, crashed = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in (pruned, failed))
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert killed.info.status == "KILLED" and crashed.info.status == "FAILED"
    assert "fp16" in crashed.data.tags["failure_reason"]
    assert {r.info.run_name for r in child_runs(client, parent)} == {"trial-0", "trial-1"}
    assert killed.data.tags["optuna.trial_number"] == "0" and killed.data.params["training.precision"] == "fp32"
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val/loss")] == [8]  # one validation


def in_process_study(tmp_path, monkeypatch, name, space, *extra, n_trials=1):
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        TINY, tiny_overrides(tmp_path, f"tracking.tracking_uri={uri}", "tracking.register_model=false", *extra).split()
    )
    storage = open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")  # no heartbeats on a journal
    return init_study(storage, name, settings_from_config(cfg, space, n_trials=n_trials, pruner="none")), uri


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_signalled_worker_requeues_its_trial_and_the_retry_resumes_it(tmp_path, monkeypatch):
    """SIGUSR1 reaches a worker at step 11 (epoch 2 of 2): the trial is saved, recorded FAIL with
    `resumable`, re-queued under a new number and the worker stops (RunInterrupted); its MLflow run ends
    KILLED, tagged resumable. The next worker's retry resumes the checkpoint and the same MLflow run to
    FINISHED; its value counts the validation reported before the signal. No run is left RUNNING."""
    import mlflow

    from promptehr.model import PromptBartWithDemographicPrediction
    from promptehr.run_status import RunInterrupted
    from promptehr.tuning.objective import Objective

    study, uri = in_process_study(tmp_path, monkeypatch, "signal", {"collator.corruption_prob": {"low": 0.3, "high": 0.7}})
    original, calls = PromptBartWithDemographicPrediction.forward, [0]

    def forward(self, *args, **kwargs):
        if self.training:
            calls[0] += 1
            if calls[0] == 11:
                os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PromptBartWithDemographicPrediction, "forward", forward)
    with pytest.raises(RunInterrupted, match="SIGUSR1 at epoch 2, batch 3 of 8"):
        run_worker(study, Objective(study))
    monkeypatch.setattr(PromptBartWithDemographicPrediction, "forward", original)
    stopped, retry = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["resumable"] is True
    assert "stopped by SIGUSR1" in stopped.user_attrs["failure_reason"]
    assert retry.state == TrialState.WAITING and retry.params == stopped.params
    assert retry.system_attrs["failed_trial"] == 0 and list(stopped.intermediate_values) == [1]
    assert retry.intermediate_values == stopped.intermediate_values  # the retry inherits the reports so far
    client = mlflow.MlflowClient(uri)
    run_id = stopped.user_attrs["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["promptehr.interrupted"] == "resumable"

    assert run_worker(study, Objective(study)) == 1
    stopped, retry = study.trials
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["mlflow_run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-1"
    assert run.data.tags["optuna.trial_number"] == "1" and run.data.tags["optuna.retry_of"] == "0"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "val/next_visit_nll")]
    assert [step for step, _ in history] == [8, 16]  # epoch 1 before the signal, epoch 2 after the resume
    assert retry.value == pytest.approx(min(v for _, v in history))
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15]  # each logged once
    assert Path(retry.user_attrs["best_checkpoint"]).parent.parent == tmp_path / "checkpoints" / "trials" / "signal" / "0"
    assert TrialBudget(1).has_work(study) is False
    running = client.search_runs([run.info.experiment_id], "attributes.status = 'RUNNING'")
    assert {r.info.run_id for r in running} == {study.user_attrs["mlflow_parent_run_id"]}  # open until finalize


def test_diverging_trial_fails_at_once_with_the_reason(tmp_path, monkeypatch):
    """learning_rate 1e4: the trial fails at the first non-finite loss (not after its epochs), FAIL with
    the step and learning rate in `failure_reason`; its run ends FAILED, outcome diverged."""
    import mlflow

    from promptehr.tuning.objective import Objective

    study, uri = in_process_study(
        tmp_path,
        monkeypatch,
        "diverge",
        {"training.learning_rate": {"type": "categorical", "choices": [1.0e4]}},
        "training.num_epochs=4",
    )
    assert run_worker(study, Objective(study)) == 1
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and not trial.intermediate_values
    assert re.search(
        r"^training diverged at step \d+ \(epoch 1, batch \d+ of 8\), learning rate", trial.user_attrs["failure_reason"]
    ), trial.user_attrs["failure_reason"]
    run = mlflow.MlflowClient(uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["promptehr.outcome"] == "diverged"
    assert "val/loss" not in run.data.metrics


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_trials_of_any_corruption_sit_the_same_exam(tmp_path, monkeypatch):
    """4 trials enqueued across corruption_prob 0.3-0.7: every trial is scored on one validation
    protocol (one protocol id) and reports val/next_visit_nll, the default objective."""
    import mlflow

    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        TINY,
        tiny_overrides(
            tmp_path, f"tracking.tracking_uri={uri}", "tracking.register_model=false", "training.learning_rate=1e-4"
        ).split(),
    )
    space = load_space()
    storage = open_storage(f"journal:{tmp_path / 'optuna_journal.log'}")
    study = init_study(storage, "exam", settings_from_config(cfg, space, n_trials=4, pruner="none"))
    fixed = {k: v for k, v in default_params(cfg, space).items() if k != "collator.corruption_prob"}
    for corruption in (0.3, 0.6, 0.7):  # trial 0, the config's own values, has 0.5
        study.enqueue_trial({**fixed, "collator.corruption_prob": corruption})
    from promptehr.tuning.objective import Objective

    assert run_worker(study, Objective(study)) == 4
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted(t.params["collator.corruption_prob"] for t in trials) == [0.3, 0.5, 0.6, 0.7]
    client = mlflow.MlflowClient(uri)
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    assert len({r.data.tags["protocol_id"] for r in runs}) == 1
    for trial, run in zip(trials, runs):
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/next_visit_nll")]
        assert len(history) == 2 and trial.value == pytest.approx(min(history))


# ------------------------------------------------------------------ the real entry point on SQLite


def test_search_on_sqlite_end_to_end_and_resume(tmp_path):
    """`python tuning/search.py` with the defaults' storage kind: 3 trials, a parent run with 3 child
    runs, best value/params/plots on the parent, the champion registered; a second call resumes."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--config",
        TINY,
        "--overrides",
        tiny_overrides(tmp_path, "training.learning_rate=1e-4"),
        "--n-trials",
        3,
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        "--study-name",
        "tiny",
        "--seed",
        0,
    ]
    search(*args, env=clean_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    defaults = {
        "training.learning_rate": 1e-4,
        "model.age_loss_weight": 1e-3,
        "model.sex_loss_weight": 1e-3,
        "collator.corruption_prob": 0.5,
        "collator.lambda_poisson": 3.0,
    }
    assert study.trials[0].params == defaults  # the config's values run first
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3

    client = mlflow.MlflowClient(uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.study_name"] == "tiny"
    children = {int(r.data.tags["optuna.trial_number"]): r for r in child_runs(client, parent_id)}
    assert sorted(children) == [0, 1, 2]
    for trial in study.trials:
        run = children[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"] and run.info.run_name == f"trial-{trial.number}"
        assert run.info.status == "FINISHED"
        assert float(run.data.params["training.learning_rate"]) == pytest.approx(trial.params["training.learning_rate"])
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/next_visit_nll")]
        assert len(history) == 2 and min(history) == pytest.approx(trial.value)  # the default objective
        assert run.data.tags["protocol_id"] == trial.user_attrs["protocol_id"] == study.trials[0].user_attrs["protocol_id"]
        checkpoint = Path(trial.user_attrs["best_checkpoint"])
        assert checkpoint.parent.parent == tmp_path / "checkpoints" / "trials" / "tiny" / str(trial.number)
        assert not client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
    best = study.best_trial
    assert parent.data.metrics["best/val_next_visit_nll"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert float(parent.data.tags["best_params.collator.corruption_prob"]) == pytest.approx(
        best.params["collator.corruption_prob"]
    )
    assert parent.data.metrics["trials/complete"] == 3
    artifacts = {a.path for d in ("plots", "study") for a in client.list_artifacts(parent_id, d)}
    assert {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/parallel_coordinate.png",
        "study/best_params.json",
        "study/trials.csv",
    } <= artifacts
    version = client.get_model_version_by_alias("promptehr", "champion")
    assert version.run_id == parent_id and version.tags["optuna.trial_number"] == str(best.number)
    assert len(client.search_logged_models([parent.info.experiment_id], filter_string=f"source_run_id = '{parent_id}'")) == 1
    assert version.tags["data_source"] == "synthetic" and version.tags["data_fingerprint"]
    assert (
        version.tags["protocol_id"] == best.user_attrs["protocol_id"]
        and version.tags["selection_metric"] == "next_visit_nll"
    )

    # resuming: the same command finds the budget spent and adds nothing; more trials extend the study
    proc = search(*args, env=clean_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path)
    assert "resuming study tiny (3 of 3 trials finished)" in proc.stderr
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 3
    assert len(child_runs(client, parent_id)) == 3
    assert len(client.search_model_versions("name = 'promptehr'")) == 1  # same best trial: not registered twice


def test_search_refuses_a_changed_study_and_parallel_sqlite(tmp_path, monkeypatch, caplog):
    from promptehr.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["tune", "init", "--config", str(TINY), "--storage", storage, "--study-name", "s", "--n-trials", "2"]) == 0
    assert main(["tune", "init", "--storage", storage, "--study-name", "s", "--n-trials", "3"]) == 0  # resumed, extended
    assert optuna.load_study(study_name="s", storage=storage).user_attrs["n_trials"] == 3
    assert main(["tune", "init", "--storage", storage, "--study-name", "s", "--objective", "val_perplexity"]) == 2
    assert "was created with another objective" in caplog.text
    assert main(["tune", "--n-workers", "2", "--storage", storage, "--study-name", "s"]) == 2
    assert "not SQLite" in caplog.text


@pytest.mark.slow
def test_mlflow_run_search_entry_point(tmp_path):
    """`mlflow run . -e search`: the run `mlflow run` creates becomes the study's parent run."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("search-cli", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns in the repo
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "search",
        "--env-manager",
        "local",
        "--experiment-name",
        "search-cli",
        "-P",
        f"config={TINY}",
        "-P",
        "n_trials=2",
        "-P",
        f"storage={storage}",
        "-P",
        "study_name=cli",
        "-P",
        f"overrides={tiny_overrides(tmp_path, 'tracking.register_model=false')}",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="cli", storage=storage)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["mlflow.project.entryPoint"] == "search" and parent.data.params["n_trials"] == "2"
    assert parent.info.status == "FINISHED" and "best/val_next_visit_nll" in parent.data.metrics
    children = child_runs(client, parent.info.run_id)
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1"]
    assert len(client.search_runs([parent.info.experiment_id])) == 3  # parent + 2 trials, no stray run


# ------------------------------------------------------------------ servers (slow, services)


def trial_runs(uri: str, study: optuna.Study):
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client, child_runs(client, study.user_attrs["mlflow_parent_run_id"])


def check_finished_study(study: optuna.Study, uri: str, n_trials: int):
    """Exactly `n_trials` finished trials with distinct numbers, each with its own child run under the
    study's parent run, with the run status matching the trial state; the parent finished."""
    client, children = trial_runs(uri, study)
    counted = TrialBudget.counted(study.trials)
    assert len(counted) == n_trials and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert len(by_number) == len(children) == n_trials  # no trial lost, none run twice
    for trial in counted:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.status == {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}[trial.state]
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(study.best_trial.number)
    return client


@pytest.mark.slow
@pytest.mark.services
def test_local_workers_share_a_postgresql_study(tmp_path, postgres, mlflow_server):
    """`--n-workers 3` on one machine: 3 processes, one study on PostgreSQL, exactly 5 trials."""
    storage = postgres.create_database("local_workers")
    search(
        "--config",
        TINY,
        "--overrides",
        tiny_overrides(tmp_path, "tracking.registered_model_name=local-workers"),
        "--n-trials",
        5,
        "--n-workers",
        3,
        "--storage",
        storage,
        "--study-name",
        "local",
        "--seed",
        1,
        env=clean_env(MLFLOW_TRACKING_URI=mlflow_server),
        cwd=tmp_path,
    )
    study = optuna.load_study(study_name="local", storage=storage)
    check_finished_study(study, mlflow_server, 5)
    # the workers ran side by side: some trials overlapped in time
    spans = sorted((t.datetime_start, t.datetime_complete) for t in TrialBudget.counted(study.trials))
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


@pytest.mark.slow
@pytest.mark.services
def test_killed_worker_trial_is_retried_and_resumes(tmp_path, postgres, mlflow_server):
    """SIGKILL a worker after its trial saved epoch 1: after the grace period the next worker fails the
    stale trial, closes its MLflow run (KILLED, resumable) and re-queues it; the retry resumes the
    checkpoint in the same MLflow run, which ends FINISHED with one validation per epoch."""
    storage = postgres.create_database("killed_worker")
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server)
    heartbeat = ["--heartbeat-interval", 1, "--grace-period", 3]
    search(
        "init",
        "--config",
        TINY,
        "--n-trials",
        1,
        "--storage",
        storage,
        "--study-name",
        "killed",
        *heartbeat,
        "--overrides",
        tiny_overrides(tmp_path, "training.num_epochs=4", "tracking.register_model=false"),
        env=env,
        cwd=tmp_path,
    )
    worker = subprocess.Popen(
        [sys.executable, str(SEARCH), "worker", "--storage", storage, "--study-name", "killed", *map(str, heartbeat)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    study = optuna.load_study(study_name="killed", storage=storage)
    try:
        run_id = wait_for(lambda: study.trials and study.trials[0].user_attrs.get("mlflow_run_id"), 180, "trial 0 to start")
        last = tmp_path / "checkpoints" / "trials" / "killed" / "0" / run_id / "last" / "metadata.json"
        wait_for(last.exists, 180, "trial 0's first checkpoint", interval=0.05)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    killed = study.trials[0]
    client, _ = trial_runs(mlflow_server, study)
    assert killed.state == TrialState.RUNNING  # nobody told the storage
    assert client.get_run(run_id).info.status == "RUNNING"
    time.sleep(4)  # > grace period
    search("worker", "--storage", storage, "--study-name", "killed", *heartbeat, env=env, cwd=tmp_path)

    killed, retry = optuna.load_study(study_name="killed", storage=storage).trials
    assert killed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params
    assert retry.system_attrs["failed_trial"] == 0 and retry.system_attrs["retry_history"] == [0]
    assert retry.user_attrs["mlflow_run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.retry_of"] == "0"
    assert "heartbeat" in run.data.tags["promptehr.stop_reason"] and run.data.tags["promptehr.interrupted"] == "resumed"
    assert "/trials/killed/0/" in run.data.tags["promptehr.resumed_from"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/next_visit_nll")) == [8, 16, 24, 32]
    assert [t.number for t in TrialBudget(1).finished(optuna.load_study(study_name="killed", storage=storage))] == [1]


@pytest.mark.slow
@pytest.mark.services
def test_slurm_job_array_reaches_the_trial_count(tmp_path, postgres, mlflow_server, slurm):
    """tuning/slurm/submit.sh on a real Slurm: init here, a 3-task array (2 at a time) of workers
    against one PostgreSQL study, then the finalize job once the array is done. No GPU request."""
    storage = postgres.create_database("slurm_array")
    env = {
        **slurm.env,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "STORAGE": storage,
        "STUDY": "slurm",
        "N_TRIALS": "4",
        "ARRAY": "0-2%2",
        "CONFIG": str(TINY),
        "SEED": "2",
        "PYTHON": sys.executable,
        "OVERRIDES": tiny_overrides(tmp_path, "tracking.registered_model_name=slurm-array"),
        "GRES": "none",
        "CPUS_PER_TASK": "1",
        "MEM": "500M",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "tuning" / "slurm" / "submit.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = dict(part.split("=") for part in proc.stdout.strip().splitlines()[-1].split())
    states = wait_for(
        lambda: (lambda s: s if all(x in ("completed", "failed", "cancelled", "timeout") for x in s) else None)(
            slurm.job_states(ids["array_job"]) + slurm.job_states(ids["finalize_job"])
        ),
        900,
        "the Slurm jobs",
        interval=2,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.out")))
    assert set(states) == {"completed"}, logs
    assert len(list((tmp_path / "logs").glob("search-*.out"))) == 3
    study = optuna.load_study(study_name="slurm", storage=storage)
    client = check_finished_study(study, mlflow_server, 4)
    assert client.get_model_version_by_alias("slurm-array", "champion").tags["optuna.study_name"] == "slurm"


@pytest.mark.slow
@pytest.mark.services
def test_slurm_search_task_signalled_mid_trial_requeues_and_the_trial_resumes(tmp_path, postgres, mlflow_server, slurm):
    """A search array task sent its early signal mid-trial (`scancel --signal=USR1 --batch`): the worker
    saves the trial and re-queues it in the study, the task requeues itself and, back, resumes the trial
    under a new number in the same MLflow run; the finalize job then closes the study. No MLflow run
    is left RUNNING."""
    storage = postgres.create_database("slurm_preempt")
    env = {
        **slurm.env,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "STORAGE": storage,
        "STUDY": "preempt",
        "N_TRIALS": "1",
        "ARRAY": "0-0",
        "CONFIG": str(TINY),
        "PYTHON": sys.executable,
        "OVERRIDES": tiny_overrides(tmp_path, "data.synthetic.n_patients=2000", "tracking.registered_model_name=preempt"),
        "GRES": "none",
        "CPUS_PER_TASK": "1",
        "MEM": "1G",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "tuning" / "slurm" / "submit.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = dict(part.split("=") for part in proc.stdout.strip().splitlines()[-1].split())
    task = f"{ids['array_job']}_0"
    log = tmp_path / "logs" / f"search-{ids['array_job']}_0.out"
    wait_for(lambda: log.exists() and "epoch 1 step 10/100" in log.read_text(errors="replace"), 600, "the trial to train")
    subprocess.run([slurm.tools["scancel"], "--signal=USR1", "--batch", task], env=slurm.env, check=True, timeout=30)
    done = ("completed", "failed", "cancelled", "timeout")
    states = wait_for(
        lambda: (lambda s: s if len(s) == 2 and all(x in done for x in s) else None)(
            slurm.job_states(task) + slurm.job_states(ids["finalize_job"])
        ),
        900,
        "the Slurm jobs",
        interval=2,
    )
    text = log.read_text(errors="replace")
    assert states == ["completed", "completed"], text[-3000:]
    assert "restarts=1" in slurm.scontrol("show", "job", task)
    assert "stopped by SIGUSR1 at epoch 1" in text and "requeueing task 0" in text

    study = optuna.load_study(study_name="preempt", storage=storage)
    stopped, retry = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["resumable"] is True
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["mlflow_run_id"] == stopped.user_attrs["mlflow_run_id"]
    client = check_finished_study(study, mlflow_server, 1)
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert (
        run.data.tags["promptehr.interrupted"] == "resumed"
        and "/trials/preempt/0/" in run.data.tags["promptehr.resumed_from"]
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/next_visit_nll")] == [100, 200]
    study_runs = client.search_runs([run.info.experiment_id], "tags.`optuna.study_name` = 'preempt'")
    assert len(study_runs) == 2 and {r.info.status for r in study_runs} == {"FINISHED"}  # parent and the trial's run
