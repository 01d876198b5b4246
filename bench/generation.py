"""Unconditional generation speed (a benchmark that prints figures).

    python bench/generation.py                                  # tiny and base shapes, batch sizes 1 16 64 256
    python bench/generation.py --shapes base --batch-sizes 64 256 1024 --patients 1024
    python bench/generation.py --checkpoint checkpoints/<run>/best_model   # a trained model
    python bench/generation.py --random-init                    # untrained weights (visits run to max length)

For each model shape a model is trained briefly (`--train-steps` optimizer steps of `promptehr.train`
on the built-in cohort, no tracking, no quality report) so that visits and patients have realistic
lengths; an untrained model samples `</v>` and `</s>` almost never and measures the worst case.
Demographics are drawn from the checkpoint's histogram (`sample_demographics`), then
`generate_patients` (batched over patients, KV cache within a visit) is timed per batch size after one
warm-up batch: patients/s, visits/s, sampled tokens/s, and the visits per patient and codes per visit
of what was generated (speed depends on both).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptehr.checkpoint import load_checkpoint, save_checkpoint
from promptehr.cli import setup_logging
from promptehr.config import load_config
from promptehr.data import load_patients, split_patients
from promptehr.engine import resolve_device
from promptehr.generate import SamplingConfig, demographics_histogram, generate_patients, sample_demographics
from promptehr.model import PromptBartWithDemographicPrediction
from promptehr.tokenizer import DiagnosisCodeTokenizer
from promptehr.tracking import Tracker
from promptehr.train import train

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"tiny": "experiments/tiny.yaml", "base": "experiments/base.yaml"}


def build_checkpoint(shape: str, train_steps: int, random_init: bool, folder: Path) -> Path:
    """A checkpoint of `shape`: trained for `train_steps` steps, or random-init (with the histogram)."""
    overrides = [
        f"training.checkpoint_dir={folder}",
        "training.quality_report=false",
        "tracking.n_sample_patients=0",
        "validation.jaccard_patients=0",
        "training.device=cpu",
    ]
    cfg = load_config(ROOT / SHAPES[shape], overrides)
    if random_init:
        patients, _, _ = load_patients(cfg.data)
        train_patients, _ = split_patients(patients, cfg.data.val_fraction, cfg.data.split_seed)
        tok = DiagnosisCodeTokenizer.from_patients(train_patients, cfg.model.visit_order)
        model = PromptBartWithDemographicPrediction(tok, cfg)
        return save_checkpoint(
            folder / "random", model, None, None, cfg, tok, {"demographics": demographics_histogram(train_patients)}
        )
    cfg = load_config(
        ROOT / SHAPES[shape],
        overrides
        + [f"training.max_steps={train_steps}", "training.num_epochs=1000", "training.validate_every_n_epochs=1000"],
    )
    return Path(train(cfg, Tracker())["best_checkpoint"])


def time_generation(model, tok, histogram, n_patients: int, batch_size: int, sampling: SamplingConfig, seed: int = 0):
    ages, sexes = sample_demographics(histogram, n_patients, seed=seed)
    w_ages, w_sexes = sample_demographics(histogram, min(batch_size, 16), seed=seed + 1)
    generate_patients(model, tok, w_ages, w_sexes, sampling, seed=seed, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    patients = generate_patients(model, tok, ages, sexes, sampling, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    visits = sum(len(p.visits) for p in patients)
    codes = sum(len(v) for p in patients for v in p.visits)
    tokens = codes + 2 * visits  # each visit also samples </v> and <v>/</s>
    return {
        "patients_per_s": len(patients) / seconds,
        "visits_per_s": visits / seconds,
        "tokens_per_s": tokens / seconds,
        "visits_per_patient": visits / len(patients),
        "codes_per_visit": codes / max(visits, 1),
        "seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "base"], choices=sorted(SHAPES))
    parser.add_argument("--checkpoint", default=None, help="time this checkpoint instead of training shapes")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--patients", type=int, default=256, help="patients generated per batch size")
    parser.add_argument("--train-steps", type=int, default=300, help="optimizer steps of the brief training")
    parser.add_argument("--random-init", action="store_true", help="untrained weights (worst case: long visits)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sampling = SamplingConfig(top_k=args.top_k, top_p=args.top_p)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"sampling top_k={args.top_k} top_p={args.top_p}, max_codes_per_visit={sampling.max_codes_per_visit}, "
        f"max_visits={sampling.max_visits}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("checkpoint", Path(args.checkpoint))] if args.checkpoint else []
        for shape in [] if args.checkpoint else args.shapes:
            t = time.perf_counter()
            folder = build_checkpoint(shape, args.train_steps, args.random_init, Path(tmp) / shape)
            how = (
                "random init" if args.random_init else f"trained {args.train_steps} steps in {time.perf_counter() - t:.0f} s"
            )
            jobs.append((f"{shape} ({how})", folder))
        for name, folder in jobs:
            model, tok, cfg, meta = load_checkpoint(folder, device)
            n_params = sum(p.numel() for p in model.parameters())
            print(
                f"\n{name}: d_model {cfg.model.d_model}, {cfg.model.encoder_layers}+{cfg.model.decoder_layers} layers, "
                f"{n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}"
            )
            print(f"{'batch':>6} {'patients/s':>11} {'visits/s':>9} {'tokens/s':>9} {'visits/pt':>10} {'codes/visit':>12}")
            for bs in args.batch_sizes:
                r = time_generation(model, tok, meta["demographics"], args.patients, bs, sampling)
                print(
                    f"{bs:>6} {r['patients_per_s']:>11.1f} {r['visits_per_s']:>9.1f} {r['tokens_per_s']:>9.0f} "
                    f"{r['visits_per_patient']:>10.2f} {r['codes_per_visit']:>12.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
