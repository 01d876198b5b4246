from pathlib import Path

import pytest

from promptehr.config import Config, ConfigError, flatten, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def test_defaults_follow_the_seed():
    cfg = load_config()
    t, c, m = cfg.training, cfg.collator, cfg.model
    assert (t.batch_size, t.num_epochs, t.learning_rate, t.weight_decay, t.warmup_steps, t.max_grad_norm) == (8, 30, 1e-4, 0.01, 1000, 1.0)
    assert (t.save_every_n_epochs, t.log_every_n_steps, t.validate_every_n_epochs) == (10, 50, 1)
    assert (c.lambda_poisson, c.mask_probability, c.del_probability, c.rep_probability, c.corruption_prob) == (3.0, 0.15, 0.15, 0.15, 0.5)
    assert (m.d_model, m.encoder_layers, m.decoder_layers, m.encoder_attention_heads) == (768, 6, 6, 12)
    assert (m.age_loss_weight, m.sex_loss_weight) == (0.001, 0.001)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("promptehr" in first or "mlflow run" in first or "python" in first), first


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "experiments" / "tiny.yaml", ["training.learning_rate=3e-4", "data.max_visits=4",
                                                            "data.path=/x", "training.compile=true"])
    assert cfg.training.learning_rate == 3e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.data.max_visits == 4 and cfg.data.path == "/x" and cfg.training.compile is True
    assert cfg.model.d_model == 32  # the file's value survives unrelated overrides


@pytest.mark.parametrize("override,needle", [
    ("training.lr=1", "training.lr"),
    ("trainig.batch_size=1", "trainig"),
    ("training.batch_size=abc", "training.batch_size"),
    ("training.batch_size=1.5", "training.batch_size"),
    ("training.compile=maybe", "training.compile"),
    ("data.synthetic.n_patients=[1]", "data.synthetic.n_patients"),
    ("no_equals_sign", "no_equals_sign"),
])
def test_bad_overrides_are_rejected_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# x\nmodel:\n  d_modle: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "model.d_modle" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_and_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["training.learning_rate=2e-4"])
    flat = flatten(cfg)
    assert flat["training.learning_rate"] == 2e-4
    assert flat["data.synthetic.n_patients"] == cfg.data.synthetic.n_patients
    assert all(not isinstance(v, dict) for v in flat.values())
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert flatten(load_config(path)) == flat
