"""The training recipe end to end: metrics, checkpoints, exact resume, MLflow run and registry."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptehr.checkpoint import load_checkpoint
from promptehr.config import load_config
from promptehr.tracking import MLflowTracker, Tracker
from promptehr.train import train

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


QUIET = ("validation.jaccard_patients=0", "training.quality_report=false")


def tiny(tmp_path, *overrides):
    return load_config(
        ROOT / "experiments" / "tiny.yaml",
        [f"training.checkpoint_dir={tmp_path / 'ck'}", "data.synthetic.n_patients=200", *overrides],
    )


def test_train_returns_honest_validation_metrics(tmp_path):
    cfg = tiny(tmp_path, "training.num_epochs=2")
    seen = []
    result = train(cfg, Tracker(), on_validate=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [0, 1]
    m = result["final_metrics"]
    for key in (
        "loss",
        "lm_loss",
        "age_loss",
        "sex_loss",
        "perplexity",
        "tpl",
        "reconstruction_jaccard",
        "reconstruction_jaccard_ranked",
        "reconstruction_jaccard_baseline",
        "tpl_frequency_baseline",
        "tpl_repeat_baseline",
    ):
        assert key in m and math.isfinite(m[key]), key
    # a 2-epoch tiny model is nowhere near a copy task: perplexity far above 1
    assert m["perplexity"] > 5 and m["tpl"] > 5
    assert 0 <= m["reconstruction_jaccard"] <= 1
    best = Path(result["best_checkpoint"])
    model, tok, cfg2, meta = load_checkpoint(best)
    # the vocabulary is the training split's: a code only held-out patients have is unknown to the model
    from promptehr.data import load_patients, split_patients

    train_p, val_p = split_patients(load_patients(cfg.data)[0], cfg.data.val_fraction, cfg.data.split_seed)
    train_codes = {c for p in train_p for v in p.visits for c in v}
    assert set(tok.codes) == train_codes and {c for p in val_p for v in p.visits for c in v} - train_codes
    assert cfg2 == cfg and meta["best_score"] == pytest.approx(result["best_score"])
    assert meta["selection_metric"] == "next_visit_nll" and meta["protocol_id"] == result["protocol_id"]
    assert {"model.safetensors", "training_state.pt", "config.yaml", "vocab.json", "metadata.json"} <= {
        p.name for p in best.iterdir()
    }
    assert "versions" in meta and meta["epoch"] in (0, 1)


class Payload:
    """Unpickling this runs code: what a tampered training_state.pt could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoint_loads_without_pickle(tmp_path):
    from promptehr.checkpoint import load_training_state

    cfg = tiny(tmp_path, "training.num_epochs=1", "validation.jaccard_patients=0", "training.quality_report=false")
    result = train(cfg, Tracker())
    folder = Path(result["best_checkpoint"])
    state = torch.load(folder / "training_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    # the project's own loader refuses a training state that would run code when unpickled
    marker = tmp_path / "payload-ran"
    torch.save({**state, "extra": Payload(marker)}, folder / "training_state.pt")
    model = load_checkpoint(folder)[0]
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()


def test_bf16_autocast_trains_like_fp32(tmp_path):
    """training.precision=bf16 (autocast; weights, optimizer state and checkpoint stay fp32) learns
    what fp32 learns: the same number of steps to a validation loss within a few percent."""
    common = ("training.num_epochs=2", "validation.jaccard_patients=0", "training.quality_report=false")
    fp32 = train(tiny(tmp_path / "f", *common), Tracker())
    bf16 = train(tiny(tmp_path / "b", *common, "training.precision=bf16"), Tracker())
    assert bf16["global_step"] == fp32["global_step"]
    f, b = fp32["final_metrics"], bf16["final_metrics"]
    assert b["loss"] == pytest.approx(f["loss"], rel=0.05) and b["loss"] != f["loss"]  # bf16 did run
    model, _, _, _ = load_checkpoint(Path(bf16["best_checkpoint"]))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_weight_average_math_and_swap():
    """training.ema_decay: average <- d_t * average + (1 - d_t) * weights, d_t = min(d, (1+t)/(10+t));
    `swapped_in` lends the model the average and gives its own weights back, even on an error."""
    from promptehr.engine import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        d = min(0.5, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for a, e in zip(average.average, expected):
        torch.testing.assert_close(a, e)
    own = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        with average.swapped_in():
            for p, e in zip(model.parameters(), expected):
                torch.testing.assert_close(p.detach(), e)
            raise RuntimeError
    for p, o in zip(model.parameters(), own):
        assert torch.equal(p.detach(), o)
    again = WeightAverage(model, 0.5)
    again.load_state_dict(average.state_dict())
    assert again.steps == 5 and all(torch.equal(a, b) for a, b in zip(again.average, average.average))


def test_best_model_keeps_the_weight_average_that_validation_scored(tmp_path):
    """With training.ema_decay the checkpoints carry the average beside the raw weights; best_model
    holds the average (what validation scored) as its weights, not a second time beside them, and its
    validation metrics are the average's."""
    from safetensors.torch import load_file

    from promptehr.validation import ValidationProtocol

    cfg = tiny(tmp_path, "training.num_epochs=1", "training.ema_decay=0.9", *QUIET)
    result = train(cfg, Tracker())
    run_dir = Path(result["checkpoint_dir"])
    state = torch.load(run_dir / "last" / "training_state.pt", weights_only=True)
    assert state["average"]["steps"] == result["global_step"]
    assert "average" not in torch.load(run_dir / "best_model" / "training_state.pt", weights_only=True)  # no 2nd copy
    raw = load_file(run_dir / "last" / "model.safetensors")
    best = load_file(run_dir / "best_model" / "model.safetensors")
    model, tok, _, _ = load_checkpoint(run_dir / "best_model")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    averaged = dict(zip(names, state["average"]["average"]))
    assert any(not torch.equal(raw[n], best[n]) for n in names if n in raw)
    for n in names:
        if n in best:
            assert torch.equal(best[n], averaged[n]), n
    from promptehr.data import load_patients, split_patients

    train_p, val_p = split_patients(load_patients(cfg.data)[0], cfg.data.val_fraction, cfg.data.split_seed)
    again = ValidationProtocol(cfg, tok, train_p, val_p).evaluate(model, torch.device("cpu"), contextlib.nullcontext)
    assert again["next_visit_nll"] == pytest.approx(result["best_metrics"]["next_visit_nll"], rel=1e-5)


def test_resuming_a_checkpoint_without_a_weight_average_starts_one_with_a_warning(tmp_path, caplog):
    """A checkpoint of a run that kept no average (training.ema_decay=0, or saved before the option)
    resumes with the average started from its weights, and says so."""
    common = ("training.save_every_n_epochs=1", *QUIET)

    def stop_in_second(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    cfg = tiny(tmp_path, "training.num_epochs=2", "training.ema_decay=0.0", *common)
    with pytest.raises(Interrupted):  # during epoch 2's validation: `last` is the end of epoch 1
        train(cfg, Tracker(), on_validate=stop_in_second)
    (last,) = Path(cfg.training.checkpoint_dir).glob("*/last")
    assert "average" not in torch.load(last / "training_state.pt", weights_only=True)
    caplog.set_level("WARNING", logger="promptehr.train")
    resumed = train(
        tiny(tmp_path, "training.num_epochs=2", "training.ema_decay=0.9", f"training.resume_from={last}", *common),
        Tracker(),
    )
    assert "holds no weight average" in caplog.text
    state = torch.load(Path(resumed["checkpoint_dir"]) / "last" / "training_state.pt", weights_only=True)
    assert state["average"]["steps"] == resumed["global_step"] // 2  # started at the resume, half-way


@pytest.mark.parametrize("ema", ["0.0", "0.9"])
def test_resumed_run_matches_an_uninterrupted_one(ema, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = (
        "training.num_epochs=3",
        "training.save_every_n_epochs=1",
        "data.synthetic.n_patients=150",
        f"training.ema_decay={ema}",
    )
    full = train(tiny(tmp_path / "a", *common), MLflowTracker(uri, "resume-test", register_model=False))

    def stop_after_second(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    cfg = tiny(tmp_path / "b", *common)
    with pytest.raises(Interrupted):
        train(cfg, MLflowTracker(uri, "resume-test", register_model=False), on_validate=stop_after_second)
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id], order_by=["start_time DESC"])
    interrupted = runs[0]
    assert interrupted.info.status == "FAILED"
    # killed during epoch 2's validation: the newest full checkpoint is the end of epoch 1
    last = Path(cfg.training.checkpoint_dir) / interrupted.info.run_id / "last"
    assert json.loads((last / "metadata.json").read_text())["epoch"] == 0
    resumed_cfg = tiny(tmp_path / "b", *common, f"training.resume_from={last}")
    resumed = train(resumed_cfg, MLflowTracker(uri, "resume-test", register_model=False))
    assert resumed["run_id"] == interrupted.info.run_id  # the same MLflow run continues
    for key in ("loss", "lm_loss", "perplexity", "tpl", "reconstruction_jaccard"):
        assert resumed["final_metrics"][key] == pytest.approx(full["final_metrics"][key], rel=1e-6, abs=1e-9), key
    run = client.get_run(interrupted.info.run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert steps == {m.step for m in client.get_metric_history(full["run_id"], "val/loss")}


# a learning rate too small to move the held-out score by 0.01 nats: every validation after the first is stale
NOT_LEARNING = (
    "training.num_epochs=6",
    "training.learning_rate=1e-9",
    "training.early_stopping_patience=2",
    "training.early_stopping_min_delta=0.01",
    "training.save_every_n_epochs=1",
    *QUIET,
)


def test_early_stopping_ends_the_run_after_patience_validations_without_improvement(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, *NOT_LEARNING)
    seen = []
    result = train(cfg, MLflowTracker(uri, "early", register_model=False), on_validate=lambda epoch, m: seen.append(epoch))
    assert seen == [0, 1, 2]  # epoch 1 sets the best, epochs 2 and 3 do not beat it by 0.01: stop
    assert result["stopped_early"].startswith("after epoch 3 of 6")
    last = Path(result["checkpoint_dir"]) / "last"
    meta = json.loads((last / "metadata.json").read_text())
    assert (meta["epoch"], meta["stale_validations"]) == (2, 2)
    assert result["global_step"] == 3 * meta["batches_done"]
    run = mlflow.MlflowClient(uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["promptehr.stopped_early"] == result["stopped_early"]
    assert len(mlflow.MlflowClient(uri).get_metric_history(result["run_id"], "val/loss")) == 3
    # off (the default), the same run trains every epoch
    full = train(tiny(tmp_path / "off", *NOT_LEARNING, "training.early_stopping_patience=0", "training.num_epochs=4"))
    assert full["stopped_early"] is None and full["final_metrics"]["epoch"] == 4


def test_a_resumed_run_keeps_its_early_stopping_count(tmp_path):
    """Interrupted at its third validation (`last`: the end of epoch 2, one stale validation), the
    resumed run trains epoch 3 and stops there, as the uninterrupted run does."""

    def stop_in_third(epoch, metrics):
        if epoch == 2:
            raise Interrupted

    cfg = tiny(tmp_path, *NOT_LEARNING)
    with pytest.raises(Interrupted):
        train(cfg, Tracker(), on_validate=stop_in_third)
    (last,) = Path(cfg.training.checkpoint_dir).glob("*/last")
    assert json.loads((last / "metadata.json").read_text())["stale_validations"] == 1
    resumed = train(tiny(tmp_path, *NOT_LEARNING, f"training.resume_from={last}"), Tracker())
    assert resumed["stopped_early"].startswith("after epoch 3 of 6")
    assert resumed["final_metrics"]["epoch"] == 3


def test_tracked_run_logs_params_metrics_artifacts_and_registers(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, "training.num_epochs=2")
    result = train(cfg, MLflowTracker(uri, "logged"))
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == str(cfg.training.learning_rate)
    assert run.data.params["model.d_model"] == "32"
    for key in (
        "train/loss",
        "train/lm_loss",
        "train/age_loss",
        "train/sex_loss",
        "train/learning_rate",
        "val/loss",
        "val/perplexity",
        "val/tpl",
        "val/reconstruction_jaccard",
        "val/tpl_frequency_baseline",
        "val/reconstruction_jaccard_baseline",
    ):
        assert key in run.data.metrics, key
    # what was logged is what train() computed
    assert run.data.metrics["val/loss"] == pytest.approx(result["final_metrics"]["loss"])
    assert run.data.tags["data.source"] == "synthetic" and int(run.data.tags["data.patients"]) == 200
    assert run.data.tags["data.generator"] == "small" and run.data.params["data.synthetic.generator"] == "small"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("config", "samples") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"config/resolved.yaml", "config/vocab.json", "samples/epoch_001.json"} <= artifacts
    samples = json.loads(
        Path(client.download_artifacts(run.info.run_id, "samples/epoch_002.json", str(tmp_path))).read_text()
    )
    assert all(p["sex"] in ("M", "F") and p["visits"] for p in samples["synthetic_patients"])
    assert "subject_id" not in json.dumps(samples)
    # registered, champion, and loadable as a pyfunc that generates patients
    version = client.get_model_version_by_alias("promptehr", "champion")
    assert version.run_id == result["run_id"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/promptehr@champion")
    import pandas as pd

    out = model.predict(pd.DataFrame({"age": [70.0, 30.0], "sex": ["M", "F"]}), params={"seed": 1})
    assert list(out["sex"]) == ["M", "F"] and (out["n_visits"] >= 1).all()
    # a worse model trained on the same data does not take the alias
    worse = train(tiny(tmp_path / "w", "training.num_epochs=1", "training.learning_rate=1e-6"), MLflowTracker(uri, "logged"))
    assert worse["model"]["champion"] is False
    assert client.get_model_version_by_alias("promptehr", "champion").version == version.version


@pytest.mark.slow
def test_mlflow_run_entry_point(tmp_path):
    """`mlflow run . --env-manager local -P epochs=1 -P config=experiments/tiny.yaml`, for real."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # in-process tests set some
    env["MLFLOW_TRACKING_URI"] = uri
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "--env-manager",
        "local",
        "--experiment-name",
        "cli",
        "-P",
        "epochs=1",
        "-P",
        "config=experiments/tiny.yaml",
        "-P",
        f"overrides=training.checkpoint_dir={tmp_path / 'ck'} data.synthetic.n_patients=200",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["training.num_epochs"] == "1"
    assert math.isfinite(run.data.metrics["val/loss"]) and run.data.metrics["val/perplexity"] > 1


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """training.compile=true runs the recipe through torch.compile (inductor; ~1-2 min of compiling
    on 2 CPU cores) and, without dropout, trains the same model as eager mode: the compiled kernels
    only reorder floating-point sums."""
    common = (
        "training.num_epochs=1",
        "validation.jaccard_patients=0",
        "training.quality_report=false",
        "model.dropout=0.0",
        "model.attention_dropout=0.0",
        "model.activation_dropout=0.0",
    )
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = train(tiny(tmp_path / "e", *common), Tracker())
    counters.clear()
    compiled = train(tiny(tmp_path / "c", *common, "training.compile=true"), Tracker())
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    torch._dynamo.reset()
    # it did compile: the training forward and the validation forward (eval mode), each one whole graph
    assert graphs == 2 and not breaks, (graphs, breaks)
    assert compiled["global_step"] == eager["global_step"] > 5
    e, c = eager["final_metrics"], compiled["final_metrics"]
    for key in ("loss", "lm_loss", "tpl"):
        assert c[key] == pytest.approx(e[key], rel=1e-3), key


def test_output_bias_starts_from_training_patients_only(tmp_path, monkeypatch):
    """The output bias is initialised from the codes of the training split: held-out patients' codes
    (the ones validation scores) must not leak into the model's starting frequencies."""
    from collections import Counter

    from promptehr.data import load_patients, split_for_training
    from promptehr.model import PromptBartWithDemographicPrediction

    seen = {}
    original = PromptBartWithDemographicPrediction.init_output_bias

    def spy(self, counts):
        seen["counts"] = list(counts)
        return original(self, counts)

    monkeypatch.setattr(PromptBartWithDemographicPrediction, "init_output_bias", spy)
    cfg = tiny(tmp_path, "model.output_bias=true", "training.num_epochs=1", "training.quality_report=false")
    result = train(cfg, Tracker())
    train_patients, val_patients = split_for_training(load_patients(cfg.data)[0], cfg.data)
    codes = load_checkpoint(result["best_checkpoint"])[1].codes
    expected = Counter(c for p in train_patients for v in p.visits for c in v)
    with_held_out = expected + Counter(c for p in val_patients for v in p.visits for c in v)
    assert seen["counts"] == [expected[c] for c in codes]
    assert seen["counts"] != [with_held_out[c] for c in codes]
