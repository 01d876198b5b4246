"""Tracking: which experiment a run goes to (the one `mlflow run` uses unless the user names another),
and the training data logged as an MLflow dataset input (aggregates, never records)."""

import json
from pathlib import Path

import pytest
from conftest import SHARED, needs_shared

from promptehr.config import load_config
from promptehr.data import load_patients, split_fingerprint, split_patients
from promptehr.tracking import MLflowTracker, dataset_description, resolve_experiment_id
from promptehr.train import train
from promptehr.tuning import runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_runs_go_where_mlflow_run_puts_them_unless_an_experiment_is_named(tracking_uri, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for name in (None, "mine"):  # no name: MLflow's Default experiment, as `mlflow run` without options
        tracker = MLflowTracker(tracking_uri, name)
        tracker.start()
        tracker.end()
        expected = "0" if name is None else client.get_experiment_by_name("mine").experiment_id
        assert client.get_run(tracker.run_id).info.experiment_id == expected
    # $MLFLOW_EXPERIMENT_NAME, which `mlflow run` honours too, moves the default of every entry point
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shared")
    tracker = MLflowTracker(tracking_uri)
    tracker.start()
    tracker.end()
    parent, experiment_id = runs.create_parent_run(tracking_uri, None, "s", {})
    shared = client.get_experiment_by_name("shared").experiment_id
    assert client.get_run(tracker.run_id).info.experiment_id == experiment_id == shared
    assert resolve_experiment_id("named", tracking_uri) != shared  # a name in the config still wins
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert resolve_experiment_id(None, tracking_uri) == "0"
    assert load_config(ROOT / "experiments" / "base.yaml").tracking.experiment_name is None


def test_training_data_is_logged_as_a_dataset_of_aggregates(tracking_uri, tmp_path, recwarn):
    import mlflow

    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        [
            f"training.checkpoint_dir={tmp_path / 'ck'}",
            "training.num_epochs=1",
            "data.synthetic.n_patients=120",
            "training.quality_report=false",
            "tracking.register_model=false",
            "tracking.n_sample_patients=0",
        ],
    )
    result = train(cfg, MLflowTracker(tracking_uri))
    run = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"])
    [entry] = run.inputs.dataset_inputs
    dataset = entry.dataset
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
    assert dataset.name == "synthetic n_patients=120 seed=0 generator=small" and dataset.source_type == "code"
    source = json.loads(dataset.source)["tags"]
    assert source["synthetic.n_patients"] == "120" and source["split_fingerprint"] == run.data.tags["split_fingerprint"]
    columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
    assert columns == [
        "split",
        "patients",
        "visits",
        "codes",
        "distinct_codes",
        "visits_per_patient",
        "codes_per_visit",
        "female_share",
        "age_mean",
    ]
    assert json.loads(dataset.profile)["num_rows"] == 2
    # counts are integer columns and never missing: MLflow's hint about missing integers is not for the user
    assert not [w for w in recwarn if "integer column" in str(w.message)]
    # the digest follows the data: another cohort seed, another digest
    patients, _, _ = load_patients(cfg.data)
    train_p, val_p = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
    assert dataset_description(cfg.data, train_p, val_p, split_fingerprint(train_p, val_p))[3] == dataset.digest
    other = load_config(None, ["data.synthetic.n_patients=120", "data.synthetic.seed=1"]).data
    patients, _, _ = load_patients(other)
    train_o, val_o = split_patients(patients, other.val_fraction, other.split_seed)
    assert dataset_description(other, train_o, val_o, split_fingerprint(train_o, val_o))[3] != dataset.digest


@needs_shared
def test_a_mimic_dataset_names_its_folder_not_its_path_and_holds_no_record():
    cfg = load_config(None, ["data.source=mimic3", f"data.path={SHARED / 'mimic3-demo'}"]).data
    patients, _, _ = load_patients(cfg)
    train_p, val_p = split_patients(patients, cfg.val_fraction, cfg.split_seed)
    name, tags, table, _ = dataset_description(cfg, train_p, val_p, split_fingerprint(train_p, val_p))
    assert name == "mimic3 mimic3-demo" and tags["folder"] == "mimic3-demo"
    assert str(SHARED) not in json.dumps(tags) and not set(json.dumps(tags).split('"')) & {p.subject_id for p in patients}
    assert list(table["split"]) == ["train", "validation"]  # one row of aggregates per split, no record
    assert list(table["patients"]) == [len(train_p), len(val_p)]
