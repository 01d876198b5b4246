"""Checkpoints: self-describing folders that load without unpickling arbitrary objects.

    model.safetensors   weights (safetensors)
    training_state.pt   optimizer, scheduler and RNG states (tensors and plain containers only,
                        read back with torch.load(weights_only=True))
    config.yaml         the resolved config
    vocab.json          the tokenizer's codes
    metadata.json       epoch, global step, metrics, best val loss, seed, versions, git commit, run id
"""

from __future__ import annotations

import json
import logging
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

FILES = ("model.safetensors", "training_state.pt", "config.yaml", "vocab.json", "metadata.json")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    import numpy
    import transformers

    import promptehr

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "promptehr": promptehr.__version__}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, model, optimizer, scheduler, cfg: Config, tokenizer: DiagnosisCodeTokenizer,
                    metadata: dict) -> Path:
    """Write a checkpoint folder atomically (to a temp sibling, then renamed over `folder`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(getattr(model, "_orig_mod", model), str(tmp / "model.safetensors"))
    state = {"rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tokenizer.save(tmp / "vocab.json")
    meta = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(),
            "git_commit": git_commit(), **metadata}
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=1, default=float))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_metadata(folder) -> dict:
    return json.loads((Path(folder) / "metadata.json").read_text())


def load_config_from_checkpoint(folder) -> Config:
    path = Path(folder) / "config.yaml"
    return config_from_dict(migrate_legacy_keys(yaml.safe_load(path.read_text())), str(path))


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a promptehr checkpoint: missing {', '.join(missing)}")
    return folder


def load_checkpoint(folder, device="cpu"):
    """(model in eval mode, tokenizer, config, metadata) from a checkpoint folder."""
    from promptehr.model import PromptBartWithDemographicPrediction

    folder = check_folder(folder)
    cfg = load_config_from_checkpoint(folder)
    tokenizer = DiagnosisCodeTokenizer.load(folder / "vocab.json")
    model = PromptBartWithDemographicPrediction(tokenizer, cfg)
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    model.to(device).eval()
    return model, tokenizer, cfg, read_metadata(folder)


def load_training_state(folder, optimizer, scheduler) -> None:
    """Restore optimizer, scheduler and RNG states (safe loader: tensors and containers only)."""
    state = torch.load(Path(folder) / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
