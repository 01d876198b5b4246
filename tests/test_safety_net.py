"""Safety net for refactoring: a 1-thread tiny run must keep producing the same numbers.

Pinned in tests/data/safety_net.json: the first 20 training losses, the validation metrics and two
seeded generated cohorts (greedy and sampled) of a fixed tiny configuration. A change that only moves
code must leave them as they are. A change meant to alter the numbers (the recipe, the objective, a
metric) regenerates the file in its own commit, saying why:

    python tests/test_safety_net.py --write
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "safety_net.json"
OVERRIDES = [  # every setting the numbers depend on, written out so a changed default does not move them
    "data.synthetic.generator=small",
    "data.synthetic.n_patients=200",
    "data.synthetic.seed=0",
    "training.num_epochs=2",
    "training.log_every_n_steps=1",
    "training.seed=42",
    "training.learning_rate=1e-3",
    "training.warmup_steps=10",
    "training.ema_decay=0.0",
    "training.batch_size=16",
    "model.output_bias=false",
    "model.recurrence_bonus=false",
    "model.visit_order=random",
    "model.tie_embeddings=true",
    "model.scale_embedding=false",
    "model.dropout=0.1",
    "validation.jaccard_patients=10",
    "training.quality_report=false",
    "tracking.n_sample_patients=0",
]
N_LOSSES, N_PATIENTS = 20, 30
TOLERANCE = 1e-4  # relative, for losses and metrics (other CPUs sum in other orders)
SAMPLED_DIFFERENT = 2  # sampled patients allowed to differ (a near-tie drawn the other way elsewhere)


def run(tmp: Path) -> dict:
    from promptehr.checkpoint import load_checkpoint
    from promptehr.config import load_config
    from promptehr.generate import SamplingConfig, generate_patients
    from promptehr.tracking import Tracker
    from promptehr.train import train

    class Recorder(Tracker):
        def __init__(self):
            self.losses = []

        def log_metrics(self, metrics, step):
            if "train/loss" in metrics:
                self.losses.append(metrics["train/loss"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(ROOT / "experiments" / "tiny.yaml", [*OVERRIDES, f"training.checkpoint_dir={tmp}"])
        recorder = Recorder()
        result = train(cfg, recorder)
        model, tok, _, _ = load_checkpoint(result["best_checkpoint"])
        ages = [float(a) for a in range(5, 5 + 3 * N_PATIENTS, 3)]
        sexes = ["M" if i % 2 else "F" for i in range(N_PATIENTS)]
        cohorts = {
            name: [p.visits for p in generate_patients(model, tok, ages, sexes, sampling, seed=7)]
            for name, sampling in (
                ("greedy", SamplingConfig(top_k=1, max_visits=4)),
                ("sampled", SamplingConfig(max_visits=4)),
            )
        }
    finally:
        torch.set_num_threads(threads)
    metrics = {k: v for k, v in result["final_metrics"].items() if isinstance(v, (int, float))}
    return {
        "losses": recorder.losses[:N_LOSSES],
        "metrics": metrics,
        **cohorts,
        "cohort_digest": hashlib.sha256(json.dumps(cohorts, sort_keys=True).encode()).hexdigest(),
    }


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-9)


def test_a_tiny_run_keeps_its_numbers(tmp_path):
    expected = json.loads(REFERENCE.read_text())
    got = run(tmp_path)
    assert len(got["losses"]) == N_LOSSES
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(got["losses"], expected["losses"])) if not close(a, b)]
    assert not bad, f"training losses moved (step, now, pinned): {bad}"
    assert set(got["metrics"]) == set(expected["metrics"]), "the validation metrics' names changed"
    moved = {k: (got["metrics"][k], v) for k, v in expected["metrics"].items() if not close(got["metrics"][k], v)}
    assert not moved, f"validation metrics moved (now, pinned): {moved}"
    assert got["greedy"] == expected["greedy"], "the greedy cohort changed"
    differ = sum(a != b for a, b in zip(got["sampled"], expected["sampled"]))
    assert differ <= SAMPLED_DIFFERENT, f"{differ} of {N_PATIENTS} sampled patients changed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    import tempfile

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        values = run(Path(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(
        f"wrote {REFERENCE}: {len(values['losses'])} losses, {len(values['metrics'])} metrics, "
        f"cohort digest {values['cohort_digest'][:12]}"
    )
