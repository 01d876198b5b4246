"""Hyperparameter search with Optuna: the only place in the project that imports optuna.

`promptehr tune` (also `python tuning/search.py`) runs a study over `space.yaml` with
`promptehr.train.train` as the objective; `tuning/slurm/` runs the same study as a Slurm job array.
See README "Hyperparameter search".
"""
