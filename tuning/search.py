"""`python tuning/search.py ARGS` is `promptehr tune ARGS`: the Optuna study over promptehr/tuning/space.yaml.

Kept as a path of its own because the README, MLproject and the Slurm scripts (tuning/slurm/) have
always called it; `promptehr tune --help` describes the steps and options.
"""

import sys

from promptehr.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
