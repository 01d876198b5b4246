"""Command line: `python -m promptehr.cli train|generate ...` (the MLproject entry points call these).

Entry points only parse arguments, build the tracker and call the package's functions.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from promptehr.config import ConfigError, load_config
from promptehr.data import DataError


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(args) -> list[str]:
    out = []
    for text in args.overrides or []:
        out += shlex.split(text)
    epochs = getattr(args, "epochs", None)
    if epochs not in (None, ""):  # MLproject passes "" when -P epochs is not given
        out.append(f"training.num_epochs={int(epochs)}")
    return out


def cmd_train(args) -> int:
    from promptehr.tracking import MLflowTracker, Tracker
    from promptehr.train import train

    cfg = load_config(args.config, _overrides(args))
    tracker = Tracker() if args.no_tracking else MLflowTracker.from_config(cfg.tracking)
    result = train(cfg, tracker)
    best = result["best_metrics"]
    logging.getLogger("promptehr").info(
        "done: best val/loss %.4f (perplexity %.2f, tpl %.2f), checkpoint %s, run %s",
        result["best_val_loss"], best.get("perplexity", float("nan")), best.get("tpl", float("nan")),
        result["best_checkpoint"], result["run_id"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptehr", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (tracked in MLflow)")
    p.add_argument("--config", default="experiments/base.yaml", help="YAML config (default: experiments/base.yaml)")
    p.add_argument("--epochs", default=None, help="training.num_epochs (empty: the config's)")
    p.add_argument("--overrides", action="append", default=[],
                   help='dotted overrides, e.g. "training.learning_rate=3e-4 data.source=mimic3" (repeatable)')
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        logging.getLogger("promptehr").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
