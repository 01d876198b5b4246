"""Checkpoint folders survive a crash at any point of their replacement (promptehr.checkpoint)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from promptehr import checkpoint as ck
from promptehr.config import load_config
from promptehr.tracking import Tracker
from promptehr.train import train

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def parts(cohort):
    from promptehr.model import PromptBartWithDemographicPrediction
    from promptehr.tokenizer import DiagnosisCodeTokenizer

    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    tokenizer = DiagnosisCodeTokenizer.from_patients(cohort[:50], cfg.model.visit_order)
    return PromptBartWithDemographicPrediction(tokenizer, cfg), cfg, tokenizer


def save(folder, parts, epoch):
    model, cfg, tokenizer = parts
    return ck.save_checkpoint(folder, model, None, None, cfg, tokenizer, {"epoch": epoch, "run_state": "running"})


# the steps of replacing an existing checkpoint, and the content a crash there must leave findable
STEPS = [
    ("writing the new files", "torch.save", 0),
    ("moving the old folder aside", "replace:1", 0),
    ("moving the new folder in", "replace:2", 0),
    ("removing the old folder", "rmtree:old", 1),
]


@pytest.mark.parametrize("where,target,epoch", STEPS, ids=[s[0] for s in STEPS])
def test_a_crash_while_replacing_last_leaves_a_complete_checkpoint(
    where, target, epoch, parts, tmp_path, monkeypatch, caplog
):
    run = tmp_path / "run"
    save(run / "last", parts, epoch=0)
    real_replace, real_rmtree, calls = os.replace, shutil.rmtree, [0]

    def replace(src, dst):
        calls[0] += 1
        if target == f"replace:{calls[0]}":
            raise Crash(where)
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if target == "rmtree:old" and str(path).endswith(".old"):
            raise Crash(where)
        return real_rmtree(path, *args, **kwargs)

    def torch_save(*args, **kwargs):
        raise Crash(where)

    monkeypatch.setattr(ck.os, "replace", replace)
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    if target == "torch.save":
        monkeypatch.setattr(ck.torch, "save", torch_save)
    with pytest.raises(Crash):
        save(run / "last", parts, epoch=1)
    monkeypatch.undo()
    found = ck.newest_complete(run)
    assert found is not None and ck.read_metadata(found)["epoch"] == epoch
    with caplog.at_level(logging.WARNING):
        resolved = ck.resolve_checkpoint(run / "last")
    assert ck.read_metadata(resolved)["epoch"] == epoch
    assert ("not a complete checkpoint" in caplog.text) == (resolved.name != "last")
    # the next save cleans up whatever the crash left
    save(run / "last", parts, epoch=2)
    assert sorted(p.name for p in run.iterdir()) == ["last"]
    assert ck.read_metadata(run / "last")["epoch"] == 2


def test_resume_after_a_crash_between_the_renames_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    """A run's `last` was being replaced when the process died (only `last.old` is left): resuming from
    `<run>/last` warns, continues from `last.old` and finishes the run."""
    common = [
        "data.synthetic.n_patients=150",
        "training.quality_report=false",
        "validation.jaccard_patients=0",
        "tracking.n_sample_patients=0",
        f"training.checkpoint_dir={tmp_path / 'ck'}",
    ]
    first = train(load_config(ROOT / "experiments" / "tiny.yaml", [*common, "training.num_epochs=1"]), Tracker())
    run = Path(first["checkpoint_dir"])
    os.replace(run / "last", run / "last.old")  # the state between the two renames
    caplog.set_level(logging.WARNING)
    resumed = train(
        load_config(
            ROOT / "experiments" / "tiny.yaml", [*common, "training.num_epochs=2", f"training.resume_from={run / 'last'}"]
        ),
        Tracker(),
    )
    assert f"{run / 'last'} is not a complete checkpoint" in caplog.text and "last.old instead" in caplog.text
    assert resumed["checkpoint_dir"] == str(run) and resumed["global_step"] == 2 * first["global_step"]
    assert ck.read_metadata(run / "last")["epoch"] == 1 and not (run / "last.old").exists()


def test_a_checkpoint_of_an_earlier_version_loads_as_it_was_trained(cohort, tmp_path):
    """A checkpoint saved before some keys existed or moved loads with what the code did then: no output
    bias (its weights have none), the 389-code cohort, codes in random order (an alphabetical vocabulary
    saved without `visit_order`), validation settings found under training.*."""
    import json

    import yaml

    from promptehr.model import PromptBartWithDemographicPrediction
    from promptehr.tokenizer import DiagnosisCodeTokenizer

    cfg = load_config(ROOT / "experiments" / "tiny.yaml", ["model.output_bias=false", "validation.prompt_prob=0.3"])
    tokenizer = DiagnosisCodeTokenizer.from_patients(cohort[:50])
    folder = ck.save_checkpoint(
        tmp_path / "old", PromptBartWithDemographicPrediction(tokenizer, cfg), None, None, cfg, tokenizer, {"epoch": 0}
    )
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    del saved["model"]["output_bias"], saved["data"]["synthetic"]["generator"], saved["model"]["visit_order"]
    vocab = json.loads((folder / "vocab.json").read_text())
    del vocab["visit_order"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    saved["training"]["prompt_prob"] = saved["validation"].pop("prompt_prob")
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))

    model, tok, loaded, _ = ck.load_checkpoint(folder)
    assert loaded.model.output_bias is False and loaded.data.synthetic.generator == "small"
    assert loaded.model.visit_order == "random" and not tok.ordered and not model.grammar_ids["ordered"]
    assert loaded.validation.prompt_prob == 0.3
    assert load_config(None).model.output_bias is True  # what a new run gets
    assert load_config(None).model.visit_order == "frequency"


def test_a_checkpoint_records_the_visit_order_of_its_vocabulary(cohort, tmp_path):
    """config.yaml's model.visit_order is the vocabulary's own (it decides the grammar), whatever the
    config object said; a hand-edited pair that disagrees is refused, naming the folder."""
    import yaml

    from promptehr.model import PromptBartWithDemographicPrediction
    from promptehr.tokenizer import DiagnosisCodeTokenizer

    cfg = load_config(ROOT / "experiments" / "tiny.yaml")
    assert cfg.model.visit_order == "frequency"
    tokenizer = DiagnosisCodeTokenizer.from_patients(cohort[:50], "random")
    folder = ck.save_checkpoint(
        tmp_path / "ck", PromptBartWithDemographicPrediction(tokenizer, cfg), None, None, cfg, tokenizer, {"epoch": 0}
    )
    model, tok, loaded, _ = ck.load_checkpoint(folder)
    assert loaded.model.visit_order == "random" and not tok.ordered and not model.grammar_ids["ordered"]
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["model"]["visit_order"] = "frequency"
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"ck: vocab.json has visit_order 'random' but config.yaml"):
        ck.load_checkpoint(folder)
