"""The one command line (`promptehr train | generate | evaluate | tune | bench`), run as users run it:
the installed `promptehr` command in a subprocess. Every command reads its config through one parser,
so a bad override ends train and tune alike; `tuning/search.py` and `bench/*.py` are the same commands
under their old paths.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from services import clean_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
PROMPTEHR = shutil.which("promptehr")


def promptehr(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """`promptehr ARGS` with this checkout's package (PYTHONPATH), no MLFLOW_* variable, in `cwd`."""
    assert PROMPTEHR, "the promptehr command is not installed (pip install -e . installs it)"
    return subprocess.run(
        [PROMPTEHR, *map(str, args)], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    """The ERROR lines, without their time and level."""
    return [line.split(" ", 2)[2] for line in stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ERROR ", line)]


def test_help_names_every_command_and_each_command_has_its_own(tmp_path):
    proc = promptehr("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert re.search(r"\{train,generate,evaluate,tune,bench\}", proc.stdout)
    tune = promptehr("tune", "--help", cwd=tmp_path)
    assert tune.returncode == 0
    for option in (
        "{run,init,worker,finalize}",
        "--storage",
        "--config",
        "--overrides",
        "--n-trials",
        "--n-workers",
        "--worker-id",
    ):
        assert option in tune.stdout
    # `python tuning/search.py` is `promptehr tune`
    script = subprocess.run(
        [sys.executable, str(ROOT / "tuning" / "search.py"), "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0 and script.stdout == tune.stdout
    bench = promptehr("bench", "--help", cwd=tmp_path)
    assert bench.returncode == 0
    for path in (ROOT / "bench").glob("*.py"):
        assert re.search(rf"^  {path.stem} +\S", bench.stdout, re.M), f"bench --help does not list {path.name}"


def test_a_benchmark_runs_through_promptehr_bench_and_a_missing_one_is_named(tmp_path):
    proc = promptehr("bench", "cohorts", "--generators", "small", "--patients", 600, "--scored", 50, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "small: 389 codes in the vocabulary; 600 patients (seed 0)" in proc.stdout
    assert re.search(r"next visits of the last 20% \(\d+ visits\), NLL nats/visit: frequency prior \d", proc.stdout)
    # the script's own arguments and errors pass through, with its exit status
    bad = promptehr("bench", "cohorts", "--generators", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
    missing = promptehr("bench", "qualty", cwd=tmp_path)
    assert missing.returncode == 2
    [line] = error_lines(missing.stderr)
    assert "promptehr bench qualty: no " in line and "benchmarks: cohorts, copying, generation, quality" in line


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.batch_sise=3", "override 'training.batch_sise=3': unknown config key training.batch_sise; valid keys"),
        ("training.batch_size=0", "invalid settings: training.batch_size=0: must be >= 1"),
    ],
)
def test_a_bad_override_ends_train_and_tune_alike_with_one_line_and_exit_2(override, message, tmp_path):
    """Train and tune name their config through one parser: the same one line, before any work (no
    checkpoint folder, no study storage, no MLflow store)."""
    common = ["--config", TINY, "--overrides", f"{override} training.checkpoint_dir={tmp_path / 'ck'}"]
    train = promptehr("train", *common, "--no-tracking", cwd=tmp_path)
    tune = promptehr("tune", *common, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", cwd=tmp_path)
    for proc in (train, tune):
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        [line] = error_lines(proc.stderr)
        assert line.startswith(f"promptehr: {message}"), line
    assert error_lines(train.stderr) == error_lines(tune.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_tune_step_refuses_options_it_does_not_use(tmp_path):
    proc = promptehr("tune", "worker", "--config", TINY, "--n-trials", 3, cwd=tmp_path)
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert "promptehr tune worker does not take --config, --n-trials" in line
