"""Checkpoints: self-describing folders that load without unpickling arbitrary objects.

    model.safetensors   weights (safetensors)
    training_state.pt   optimizer, scheduler and RNG states, the loop's place in its epoch (tensors and
                        plain containers only, read back with torch.load(weights_only=True))
    config.yaml         the resolved config
    vocab.json          the tokenizer's codes
    metadata.json       epoch, position in it, run state, metrics, best score, seed, versions, run id
A folder is replaced by renames only, so a complete checkpoint exists at every instant (`newest_complete`).
Generation needs only `MODEL_FILES` (a logged MLflow model carries no training_state.pt); a resume needs all.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from promptehr.config import Config, config_from_dict, migrate_legacy_keys, to_dict
from promptehr.tokenizer import DiagnosisCodeTokenizer

logger = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "config.yaml", "vocab.json", "metadata.json")  # what generation loads
FILES = (*MODEL_FILES, "training_state.pt")  # what training resumes from


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    import numpy
    import transformers

    import promptehr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "promptehr": promptehr.__version__,
    }


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder,
    model,
    optimizer,
    scheduler,
    cfg: Config,
    tokenizer: DiagnosisCodeTokenizer,
    metadata: dict,
    loop_state: dict | None = None,
    average: dict | None = None,
) -> Path:
    """Write a checkpoint folder crash-safely: into `<folder>.tmp`, then `folder` -> `<folder>.old`,
    `<folder>.tmp` -> `folder`, and `<folder>.old` removed. A crash at any point leaves `folder` or
    `<folder>.old` complete (`newest_complete` finds it). `loop_state`: the loop's place in its epoch;
    `average`: the weight average's state (`engine.WeightAverage.state_dict`)."""
    folder = Path(folder)
    tmp, old = _sibling(folder, ".tmp"), _sibling(folder, ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(getattr(model, "_orig_mod", model), str(tmp / "model.safetensors"))
    state = {"rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if loop_state is not None:
        state["loop"] = loop_state
    if average is not None:
        state["average"] = average
    torch.save(state, tmp / "training_state.pt")
    saved = to_dict(cfg)
    saved["model"]["visit_order"] = tokenizer.visit_order  # what the vocabulary is (it decides the grammar)
    (tmp / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    tokenizer.save(tmp / "vocab.json")
    meta = {
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        **metadata,
    }
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=1, default=float))
    _sync(tmp)  # on disk before the renames point at it (a lost node, not only a killed process)
    if folder.exists():
        if old.exists():  # an earlier crash left both: `folder` is the newer and complete one
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def _sync(folder: Path) -> None:
    for path in (*folder.iterdir(), folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems refuse fsync on a directory
            pass
        finally:
            os.close(fd)


def is_complete(folder) -> bool:
    """Whether `folder` is a checkpoint with every file and readable metadata."""
    folder = Path(folder)
    if not folder.is_dir() or any(not (folder / f).is_file() for f in FILES):
        return False
    try:
        read_metadata(folder)
    except (OSError, ValueError):
        return False
    return True


def position(meta: dict) -> tuple[int, int]:
    """(epoch, batches done in it) a checkpoint continues from; an epoch that is complete (validated,
    checkpoints written) counts as the start of the next one."""
    if meta.get("epoch_complete", True):
        return meta.get("epoch", -1) + 1, 0
    return meta["epoch"], meta["batches_done"]


def newest_complete(run_folder) -> Path | None:
    """The checkpoint of a run's folder that is furthest on (`last`, or what a crash left of it: `last.old`,
    else the newest `epoch_NNN`); None when there is no complete one."""
    run_folder = Path(run_folder)
    candidates = [run_folder / n for n in ("last", "last.old")] + sorted(run_folder.glob("epoch_[0-9]*"))
    complete = [
        (position(read_metadata(c)), i, c)
        for i, c in enumerate(candidates)
        if not c.name.endswith(".tmp") and is_complete(c)
    ]
    return max(complete, key=lambda t: (t[0], -t[1]))[2] if complete else None


def resolve_checkpoint(folder) -> Path:
    """`folder` if it is a complete checkpoint, else the newest complete one of its run (with a warning)."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    fallback = newest_complete(folder.parent)
    if fallback is None:
        check_folder(folder)  # raises with what is missing
        raise FileNotFoundError(f"{folder}: not a complete checkpoint, and {folder.parent} holds none")
    logger.warning("%s is not a complete checkpoint (a crash while it was written?): using %s instead", folder, fallback)
    return fallback


def mark_run_state(folder, run_state: str, **extra) -> None:
    """Record in a checkpoint's metadata how its run stands (running, interrupted, finished, failed...),
    replacing metadata.json by a rename so that it is never half written."""
    folder = Path(folder)
    meta = {**read_metadata(folder), "run_state": run_state, **extra}
    tmp = folder / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=float))
    os.replace(tmp, folder / "metadata.json")


def read_metadata(folder) -> dict:
    return json.loads((Path(folder) / "metadata.json").read_text())


def load_config_from_checkpoint(folder) -> Config:
    path = Path(folder) / "config.yaml"
    return config_from_dict(migrate_legacy_keys(yaml.safe_load(path.read_text())), str(path))


def check_folder(folder, files=FILES) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a promptehr checkpoint: missing {', '.join(missing)}")
    return folder


def load_checkpoint(folder, device="cpu"):
    """(model in eval mode, tokenizer, config, metadata) from a checkpoint folder."""
    from promptehr.model import PromptBartWithDemographicPrediction

    folder = check_folder(folder, MODEL_FILES)
    cfg = load_config_from_checkpoint(folder)
    tokenizer = DiagnosisCodeTokenizer.load(folder / "vocab.json")
    if tokenizer.visit_order != cfg.model.visit_order:
        raise ValueError(
            f"{folder}: vocab.json has visit_order {tokenizer.visit_order!r} but config.yaml model.visit_order "
            f"{cfg.model.visit_order!r}: the two files are not of the same checkpoint"
        )
    model = PromptBartWithDemographicPrediction(tokenizer, cfg)
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    model.to(device).eval()
    return model, tokenizer, cfg, read_metadata(folder)


def load_training_state(folder, optimizer, scheduler) -> tuple[dict | None, dict | None]:
    """Restore optimizer, scheduler and RNG states (safe loader: tensors and containers only); returns
    the loop state saved with them (None for a checkpoint saved at the end of an epoch) and the weight
    average's state (None when the run kept none)."""
    state = torch.load(Path(folder) / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state.get("loop"), state.get("average")
