from pathlib import Path

import pytest

from promptehr.config import Config, ConfigError, flatten, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def test_defaults_follow_the_seed():
    cfg = load_config()
    t, c, m = cfg.training, cfg.collator, cfg.model
    assert (t.batch_size, t.num_epochs, t.learning_rate, t.weight_decay, t.warmup_steps, t.max_grad_norm) == (
        8,
        30,
        1e-4,
        0.01,
        1000,
        1.0,
    )
    assert (t.save_every_n_epochs, t.log_every_n_steps, t.validate_every_n_epochs) == (10, 50, 1)
    assert (c.lambda_poisson, c.mask_probability, c.del_probability, c.rep_probability, c.corruption_prob) == (
        3.0,
        0.15,
        0.15,
        0.15,
        0.5,
    )
    assert (m.d_model, m.encoder_layers, m.decoder_layers, m.encoder_attention_heads) == (768, 6, 6, 12)
    assert (m.age_loss_weight, m.sex_loss_weight) == (0.001, 0.001)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("promptehr" in first or "mlflow run" in first or "python" in first), first


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        ROOT / "experiments" / "tiny.yaml",
        ["training.learning_rate=3e-4", "data.max_visits=4", "data.path=/x", "training.compile=true"],
    )
    assert cfg.training.learning_rate == 3e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.data.max_visits == 4 and cfg.data.path == "/x" and cfg.training.compile is True
    assert cfg.model.d_model == 32  # the file's value survives unrelated overrides


@pytest.mark.parametrize(
    "override,needle",
    [
        ("training.lr=1", "training.lr"),
        ("trainig.batch_size=1", "trainig"),
        ("training.batch_size=abc", "training.batch_size"),
        ("training.batch_size=1.5", "training.batch_size"),
        ("training.compile=maybe", "training.compile"),
        ("data.synthetic.n_patients=[1]", "data.synthetic.n_patients"),
        ("no_equals_sign", "no_equals_sign"),
    ],
)
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


# ------------------------------------------------------------------ values checked before any work

BAD_SETTINGS = [  # (override, what the one line must say)
    ("training.batch_size=0", "training.batch_size=0: must be >= 1"),
    ("training.batch_size=-4", "training.batch_size=-4: must be >= 1"),
    ("training.num_epochs=0", "training.num_epochs=0: must be >= 1"),
    ("training.validate_every_n_epochs=0", "training.validate_every_n_epochs=0: must be >= 1"),
    ("training.save_every_n_epochs=0", "training.save_every_n_epochs=0: must be >= 1"),
    ("training.early_stopping_patience=-1", "training.early_stopping_patience=-1: must be >= 0"),
    ("training.early_stopping_min_delta=-0.1", "training.early_stopping_min_delta=-0.1: must be >= 0"),
    ("training.log_every_n_steps=0", "training.log_every_n_steps=0: must be >= 1"),
    ("training.max_steps=0", "training.max_steps=0: must be null or >= 1"),
    ("training.learning_rate=0", "training.learning_rate=0.0: must be > 0"),
    ("training.learning_rate=-1e-3", "training.learning_rate=-0.001: must be > 0"),
    ("training.warmup_steps=-1", "training.warmup_steps=-1: must be >= 0"),
    ("training.weight_decay=-0.1", "training.weight_decay=-0.1: must be >= 0"),
    ("training.max_grad_norm=0", "training.max_grad_norm=0.0: must be > 0, or null for no clipping"),
    ("training.max_grad_norm=-1", "training.max_grad_norm=-1.0: must be > 0, or null for no clipping"),
    ("training.num_workers=-1", "training.num_workers=-1: must be >= 0"),
    ("training.precision=fp16", "training.precision=fp16: must be one of fp32, bf16"),
    ("training.device=gpu", "training.device=gpu: must be auto, cpu, cuda or cuda:N"),
    ("training.resume_from=/no/such/run/last", "training.resume_from=/no/such/run/last: no such run folder"),
    ("training.quality_report_patients=-1", "training.quality_report_patients=-1: must be >= 0"),
    ("data.val_fraction=0", "data.val_fraction=0.0: must be 0 < value < 1"),
    ("data.val_fraction=1", "data.val_fraction=1.0: must be 0 < value < 1"),
    ("data.min_visits=0", "data.min_visits=0: must be >= 1"),
    ("data.max_visits=0", "data.max_visits=0: must be null or >= 1"),
    ("data.source=mimic5", "data.source=mimic5: must be one of synthetic, mimic3, mimic4, meds"),
    ("data.source=mimic3", "data.path=null: data.source=mimic3 needs the folder of its tables"),
    ("data.split=meds", "data.split=meds: needs data.source=meds"),
    ("data.icd_versions=11", "data.icd_versions=11: must be one of 9, 10, both"),
    ("data.synthetic.generator=markov", "data.synthetic.generator=markov: must be one of"),
    ("model.visit_order=alphabetical", "model.visit_order=alphabetical: must be one of frequency, random"),
    ("training.ema_decay=1.0", "training.ema_decay=1.0: must be 0 <= value < 1 (0: off)"),
    ("data.synthetic.n_patients=1", "data.synthetic.n_patients=1: must be >= 2"),
    ("collator.corruption_prob=1.5", "collator.corruption_prob=1.5: must be 0 <= value <= 1"),
    ("collator.lambda_poisson=0", "collator.lambda_poisson=0.0: must be > 0"),
    ("collator.max_length=4", "collator.max_length=4: must be >= 8"),
    ("model.d_model=31", "model.encoder_attention_heads=2: must divide model.d_model=31"),
    ("model.decoder_attention_heads=3", "model.decoder_attention_heads=3: must divide model.d_model=32"),
    ("model.encoder_layers=0", "model.encoder_layers=0: must be >= 1"),
    ("model.dropout=1", "model.dropout=1.0: must be 0 <= value < 1"),
    (
        "model.max_position_embeddings=100",
        "model.max_position_embeddings=100: must be >= collator.max_length + 2 prompt positions = 514",
    ),
    ("model.age_loss_weight=-1", "model.age_loss_weight=-1.0: must be >= 0"),
    ("validation.batch_size=0", "validation.batch_size=0: must be >= 1"),
    ("validation.prompt_prob=2", "validation.prompt_prob=2.0: must be 0 <= value <= 1"),
    ("validation.jaccard_patients=-5", "validation.jaccard_patients=-5: must be >= 0"),
    ("tracking.n_sample_patients=-1", "tracking.n_sample_patients=-1: must be >= 0"),
    ("data.icd_versions=9 data.split=x", "data.split=x: must be one of random, meds"),  # 9: read as text
]


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_setting_stops_the_cli_before_any_work(override, message, tmp_path, caplog, monkeypatch):
    """`promptehr train` with a value out of range: exit 2 and one line naming the key, its value and
    the allowed range, before data is read or a run or checkpoint folder is made."""
    from promptehr import data
    from promptehr.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("data were read before the settings were checked")

    monkeypatch.setattr(data, "load_patients", no_data)
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "--config",
        str(ROOT / "experiments" / "tiny.yaml"),
        "--overrides",
        f"{override} training.checkpoint_dir={tmp_path / 'ck'}",
        "--no-tracking",
    ]
    assert main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "mlflow.db").exists()


def test_every_rule_has_a_row_in_the_table_and_the_base_configs_pass():
    """Each checked key is exercised by BAD_SETTINGS (or named here), and every experiment file passes."""
    from promptehr.config import PROMPT_POSITIONS, _value_rules, check_config
    from promptehr.model import N_PROMPTS

    assert PROMPT_POSITIONS == N_PROMPTS
    tested = {o.split("=")[0] for o, _ in BAD_SETTINGS}
    untested = (
        set(_value_rules())
        - tested
        - {  # same rule as a tested neighbour
            "collator.mask_probability",
            "collator.del_probability",
            "collator.rep_probability",
            "collator.first_visit_prob",
            "model.decoder_layers",
            "model.encoder_attention_heads",
            "model.decoder_attention_heads",
            "model.encoder_ffn_dim",
            "model.decoder_ffn_dim",
            "model.prompt_hidden_size",
            "model.attention_dropout",
            "model.activation_dropout",
            "model.sex_loss_weight",
            "model.target_visit_loss_weight",
            "model.d_model",
            "data.max_patients",
            "training.quality_report_released_patients",
            "validation.corruption_prob",
            "validation.lambda_poisson",
            "validation.mask_probability",
            "validation.del_probability",
            "validation.rep_probability",
            "tracking.registered_model_name",
            "tracking.experiment_name",
        }
    )  # blank names: only from a YAML file
    assert not untested, untested
    for path in EXPERIMENTS:
        overrides = ["data.path=/data"] if "mimic" in path.name or "meds" in path.name else []
        check_config(load_config(path, overrides))
    check_config(load_config(None, ["training.max_grad_norm=null"]))  # no clipping is allowed


def test_max_position_embeddings_rule_is_the_model_limit():
    """The model fits a max-length row with its two prompts at exactly max_length + 2 positions, and
    not at one fewer: the rule's bound is the real one."""

    from promptehr.collator import EHRDataCollator, EHRPatientDataset
    from promptehr.model import PromptBartWithDemographicPrediction
    from promptehr.schema import Patient
    from promptehr.tokenizer import DiagnosisCodeTokenizer

    codes = [f"{i:03d}" for i in range(60)]
    patient = Patient("1", 50.0, "F", [codes[i : i + 6] for i in range(0, 60, 6)])  # 10 visits of 6 codes
    tokenizer = DiagnosisCodeTokenizer.from_patients([patient])
    max_length = 2 + 10 * 8  # <s> </s> and 10 x (<v> 6 codes </v>): the row fills max_length
    batch_of = lambda cfg: EHRDataCollator.from_config(tokenizer, cfg.collator)(  # noqa: E731
        [EHRPatientDataset([patient], tokenizer, max_length)[0]]
    )
    for positions, fits in ((max_length + 2, True), (max_length + 1, False)):
        cfg = load_config(
            ROOT / "experiments" / "tiny.yaml",
            [
                f"collator.max_length={max_length}",
                f"model.max_position_embeddings={positions}",
                "collator.corruption_prob=0",
                "collator.next_visit_rows=false",
                "collator.first_visit_prob=0",
            ],
        )
        batch = batch_of(cfg)
        assert batch["input_ids"].shape[1] == max_length
        model = PromptBartWithDemographicPrediction(tokenizer, cfg).eval()
        if fits:
            model(**batch)
        else:
            with pytest.raises((IndexError, RuntimeError)):
                model(**batch)
