"""Registry: a checkpoint as a logged MLflow pyfunc model (models-from-code, `pyfunc_model.py`), its
registered versions and alias `champion`, which moves to a version only when it beats the champion
trained on the same data on the same validation protocol; and the way back from a model URI to its
checkpoint folder. Called by the tracker at the end of a run, by tuning at the end of a study, and by
the command line for `--model models:/...`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def pyfunc_signature():
    """The logged model's signature. `age`, `n_visits` and `seed` are of MLflow's type `any`: no
    column type accepts both ints and floats (a `double` column refuses int64, a `long` column
    refuses floats and so empty cells), and predict() checks these values itself, row by row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(AnyType(), "age"),
            ColSpec("string", "sex"),
            ColSpec(AnyType(), "n_visits", required=False),
            ColSpec(AnyType(), "seed", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "patient_id"),
            ColSpec("double", "age"),
            ColSpec("string", "sex"),
            ColSpec("long", "n_visits"),
            ColSpec("string", "visits"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("temperature", "double", 1.0),
            ParamSpec("top_k", "long", 0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("max_visits", "long", 20),
            ParamSpec("seed", "long", 0),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pyfunc_model(checkpoint_dir: str, registered_model_name: str | None):
    """Log `checkpoint_dir` as an `mlflow.pyfunc` model from code (`pyfunc_model.py`). The model carries
    the checkpoint's `MODEL_FILES` only: the optimizer state and weight average of training_state.pt
    (three times the weights) serve a resume, not generation."""
    import shutil
    import tempfile

    import mlflow

    from promptehr.checkpoint import MODEL_FILES, check_folder

    source = check_folder(checkpoint_dir, MODEL_FILES)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / source.name
        staged.mkdir()
        for name in MODEL_FILES:
            shutil.copy2(source / name, staged / name)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(staged)},
            signature=pyfunc_signature(),
            registered_model_name=registered_model_name,
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=_requirements(),
        )


def download_model_checkpoint(model_uri: str, dst_path: str | None = None, tracking_uri: str | None = None) -> Path:
    """The checkpoint folder inside a logged promptehr pyfunc model (`models:/promptehr@champion`,
    `models:/promptehr/3`, `runs:/<run id>/model`), downloaded to `dst_path` (a temp folder if None)
    from `tracking_uri` (None: the one MLflow is set to; `tracking.resolve_tracking_uri` names it)."""
    import mlflow
    import yaml

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    try:
        relative = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    except (KeyError, TypeError):
        raise FileNotFoundError(f"{model_uri} is not a promptehr model (no `checkpoint` artifact in its MLmodel)") from None
    return local / relative


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("torch", "transformers", "mlflow", "numpy", "pandas", "pyyaml", "safetensors", "tqdm")
    ]


def promote_champion(model_name: str, version: str, score: float, tags: dict, rescore=None) -> bool:
    """Tag the version with `tags` and its score; move alias `champion` to it if there is none, or if
    the champion was trained on the same data (`data_fingerprint`) and scores worse on the same
    validation protocol (`protocol_id`, metric `selection_metric`, lower is better). A champion
    measured on another protocol, or registered before protocols existed, is first re-scored on this
    version's protocol with `rescore(checkpoint folder) -> score` (a legacy champion keeps the result as
    its tags); without `rescore` the two are not compared and the champion stays. Returns whether the
    version took the alias."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    metric = tags.get("selection_metric", "next_visit_nll")
    for key, value in {**tags, metric: score}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    try:
        current = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        current = None
    if current is not None:
        if current.tags.get("data_fingerprint") != str(tags.get("data_fingerprint")):
            logger.info(
                "champion v%s was trained on other data; v%s does not replace it "
                "(set it by hand: MlflowClient().set_registered_model_alias(%r, 'champion', %s))",
                current.version,
                version,
                model_name,
                version,
            )
            return False
        same_exam = (
            current.tags.get("protocol_id") == str(tags.get("protocol_id"))
            and current.tags.get("selection_metric") == metric
            and metric in current.tags
        )
        if same_exam:
            champion_score = float(current.tags[metric])
        else:
            if rescore is None:
                logger.info(
                    "champion v%s was measured on another validation protocol and cannot be re-scored here; it stays",
                    current.version,
                )
                return False
            with tempfile.TemporaryDirectory() as tmp:
                folder = download_model_checkpoint(f"models:/{model_name}/{current.version}", tmp, mlflow.get_tracking_uri())
                champion_score = float(rescore(folder))
            logger.info(
                "champion v%s was measured on protocol %s: re-scored on protocol %s, %s %.4f",
                current.version,
                current.tags.get("protocol_id", "(none: registered before protocols)"),
                tags.get("protocol_id"),
                metric,
                champion_score,
            )
            if "protocol_id" not in current.tags:  # a legacy champion: keep the score it now has
                for key, value in {
                    "protocol_id": tags.get("protocol_id"),
                    "selection_metric": metric,
                    metric: champion_score,
                    "rescored": "true",
                }.items():
                    client.set_model_version_tag(model_name, current.version, key, str(value))
        if not (math.isfinite(score) and (score < champion_score or not math.isfinite(champion_score))):
            logger.info(
                "champion v%s (%s %.4f) stays; v%s has %.4f", current.version, metric, champion_score, version, score
            )
            return False
    elif not math.isfinite(score):
        logger.warning("v%s has %s %s: it does not become the champion", version, metric, score)
        return False
    client.set_registered_model_alias(model_name, "champion", version)
    logger.info("registered %s v%s is the new champion (%s %.4f)", model_name, version, metric, score)
    return True
