"""Does a config's recipe learn to copy, on every built-in cohort and seed? (a benchmark that prints figures)

    python bench/copying.py                     # base.yaml, 20,000 patients: its first 3 epochs of 12
    python bench/copying.py --config experiments/mimic3.yaml --patients 1200 --epochs 8 --stop-after 8 \
        --warmup-share 0.03 --generators hmm --seeds 1 --overrides "training.batch_size=8"
                                                # the bart-base recipe at a reduced size (22 min on 2 cores)

For each generator (`data.synthetic.generator`) and seed (`training.seed`) the config trains on the
built-in cohort of `--patients` patients with `promptehr.train.train` (no tracking), its learning-rate
schedule spanning `--epochs` epochs (default: the config's), and is validated after every epoch by the
fixed protocol; the run stops after `--stop-after` validations (default: the epoch at which the stuck-run
warning checks). Printed per epoch: optimizer steps so far, the copy ratio,
the reconstruction rows' perplexity over the perplexity a model that ignores the encoder scores on
them (the measure of the stuck-run warning, `promptehr.validation.copy_warning`: a healthy run falls
below COPY_RATIO_LIMIT), the next-visit NLL against the frequency and repeat baselines, and whether
the run would get the stuck-run warning there.

The model shape, learning rate, batch size and optimizer are the config's; the cohort replaces the
config's data section. For a run shorter than the config's (a GPU config at a reduced size), the
schedule spans `--epochs` and `--warmup-share` sets the warmup as a share of the run's optimizer steps
(the configs' own warmups are about 3% of their full runs). On a CPU, precision is fp32 and the
collation runs in the main process (no workers).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

from promptehr.cli import add_config_arguments, overrides_of, setup_logging
from promptehr.config import load_config
from promptehr.validation import COPY_CHECK_EPOCH, COPY_RATIO_LIMIT, copy_ratio, copy_warning

ROOT = Path(__file__).resolve().parents[1]

GENERATORS = ("hmm", "transition", "small")


def steps_per_epoch(cfg, patients: int) -> int:
    """Optimizer steps per epoch: one batch per `batch_size` training patients (RowBucketSampler)."""
    return math.ceil(round(patients * (1 - cfg.data.val_fraction)) / cfg.training.batch_size)


def run_overrides(
    cfg, generator: str, seed: int, patients: int, epochs: int, warmup_share: float | None, cpu: bool
) -> list[str]:
    """The overrides that turn a config into its run on the built-in cohort."""
    out = [
        "data.source=synthetic",
        "data.path=null",
        f"data.synthetic.generator={generator}",
        f"data.synthetic.n_patients={patients}",
        f"training.seed={seed}",
        f"training.num_epochs={epochs}",
        "training.validate_every_n_epochs=1",
        "training.early_stopping_patience=0",  # a learning curve: every epoch up to --stop-after
        "training.quality_report=false",
        "validation.jaccard_patients=0",
        "tracking.n_sample_patients=0",
    ]
    if warmup_share is not None:
        out.append(f"training.warmup_steps={max(1, round(warmup_share * epochs * steps_per_epoch(cfg, patients)))}")
    if cpu:
        out += ["training.precision=fp32", "training.num_workers=0", "training.compile=false"]
    return out


def train_one(config: str, overrides: list[str], stop_after: int, show=None) -> tuple[list[dict], float]:
    """Train `config` with `overrides` in a temporary folder for at most `stop_after` epochs: the
    validation metrics of every epoch (each also handed to `show` as it comes), minutes."""
    from promptehr.tracking import Tracker
    from promptehr.train import TrainingPruned, train

    epochs: list[dict] = []

    def record(epoch, metrics):
        epochs.append(dict(metrics, epoch=epoch + 1))
        if show is not None:
            show(epochs[-1])
        if epoch + 1 >= stop_after:
            raise TrainingPruned(f"stopped after epoch {epoch + 1}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-copying-") as tmp:
        cfg = load_config(config, [*overrides, f"training.checkpoint_dir={tmp}"])
        try:
            train(cfg, Tracker(), on_validate=record)
        except TrainingPruned:
            pass
    return epochs, (time.perf_counter() - start) / 60


def first_copying_epoch(epochs: list[dict]) -> int | None:
    """The first epoch whose copy ratio is below the stuck-run warning's limit (None: never)."""
    return next((m["epoch"] for m in epochs if copy_ratio(m) < COPY_RATIO_LIMIT), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, str(ROOT / "experiments" / "base.yaml"))
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=GENERATORS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training.seed of each run")
    parser.add_argument("--patients", type=int, default=20000, help="cohort size (default 20000: 16,000 training)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs the schedule spans (default: the config's)")
    parser.add_argument(
        "--stop-after", type=int, default=COPY_CHECK_EPOCH, help=f"validations per run (default {COPY_CHECK_EPOCH})"
    )
    parser.add_argument(
        "--warmup-share",
        type=float,
        default=None,
        help="warmup as a share of the run's steps (default: the config's warmup)",
    )
    parser.add_argument("--device", default="cpu", help="training.device (default cpu: fp32, no workers)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    for noisy in ("promptehr.train", "promptehr.data", "promptehr.schema"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    base = load_config(args.config, overrides_of(args))
    epochs = args.epochs or base.training.num_epochs
    per_epoch = steps_per_epoch(base, args.patients)
    stop_after = min(args.stop_after, epochs)
    cpu = args.device == "cpu"
    results = []
    warmup = (
        f"{args.warmup_share:.0%} of its steps" if args.warmup_share is not None else f"{base.training.warmup_steps} steps"
    )
    print(f"config {args.config} {' '.join(overrides_of(args))}")
    print(
        f"shape d_model {base.model.d_model}, {base.model.encoder_layers}+{base.model.decoder_layers} layers; "
        f"learning rate {base.training.learning_rate:g}, batch {base.training.batch_size}; {args.patients} patients, "
        f"{per_epoch} steps per epoch, schedule of {epochs} epochs, warmup {warmup}; "
        f"stopped after epoch {stop_after}; copy ratio limit {COPY_RATIO_LIMIT}"
    )
    columns = ("steps", "copy ratio", "recon ppl", "next-visit NLL", "frequency", "repeat")
    print(f"\n{'generator':<11} {'seed':>4} {'epoch':>5} " + " ".join(f"{c:>10}" for c in columns) + "  stuck warning")
    for generator in args.generators:
        for seed in args.seeds:
            overrides = [
                *overrides_of(args),
                *run_overrides(base, generator, seed, args.patients, epochs, args.warmup_share, cpu),
                f"training.device={args.device}",
            ]

            def show(m, generator=generator, seed=seed):
                steps = m["epoch"] * per_epoch
                values = (copy_ratio(m), m["perplexity_reconstruction"], m["next_visit_nll"])
                baselines = (m["next_visit_nll_frequency"], m["next_visit_nll_repeat"])
                print(
                    f"{generator:<11} {seed:>4} {m['epoch']:>5} {steps:>10} {values[0]:>10.4f} "
                    + " ".join(f"{v:>10.2f}" for v in (*values[1:], *baselines))
                    + f"  {'yes' if copy_warning(m, steps) else '-'}",
                    flush=True,
                )

            validations, minutes = train_one(args.config, overrides, stop_after, show)
            results.append((generator, seed, first_copying_epoch(validations), minutes))
    print("\nfirst epoch below the copy ratio limit (none: the run never learned to copy):")
    for generator, seed, epoch, minutes in results:
        print(f"  {generator:<11} seed {seed}: {epoch if epoch else 'none'} ({minutes:.1f} min)")
    copied = sum(epoch is not None for _, _, epoch, _ in results)
    print(f"{copied} of {len(results)} runs learned to copy within {stop_after} epochs")
    return 0 if copied == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
