"""MLflow tracking for training: params, per-step metrics, sample grids, lineage and the final pipeline.

Only the main process creates a `MlflowTracker`; the other ranks use `NullTracker`.
The pipeline is logged as an MLflow pyfunc model built from code (`mlflow_pyfunc_model.py`, no
cloudpickle) with the `save_pretrained` folder as its `pipeline` artifact, and registered under
`registered_model_name`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc_model.py")
PREDICT_DEFAULTS: dict[str, int | float] = {"num_inference_steps": 50, "guidance_scale": 3.0, "seed": 0}
"""The pyfunc model's params and their defaults (also in its signature)."""


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created when missing. Runs that start at once (deployments on one
    worker) race to create it: the loser's RESOURCE_ALREADY_EXISTS is the winner's experiment."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException as err:
        found = client.get_experiment_by_name(name)
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
            raise
        return str(found.experiment_id)


class NullTracker:
    """Tracker of non-main processes (and of runs with MLflow switched off): does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def log_lineage(self, lineage: Mapping[str, Any]) -> None: ...
    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_pipeline(
        self,
        pipeline_dir: str | Path,
        registered_model_name: str | None,
        *,
        lineage: Mapping[str, Any] | None = None,
        pip_requirements: Iterable[str] | None = None,
    ) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run (new, or continued when `run_id` is given, e.g. after resume)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ):
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        if run_id is None:
            mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(), experiment))
            # Nested under a pipeline run (the UI groups them) when a parent is given.
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            run = mlflow.start_run(run_name=run_name, tags=tags)
            commit = git_commit()
            if commit:
                mlflow.set_tag("git_commit", commit)
        else:
            run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        client = self._mlflow.MlflowClient()
        existing = client.get_run(self.run_id).data.params
        new = {k: str(v) for k, v in params.items() if k not in existing}
        changed = {k: str(v) for k, v in params.items() if k in existing and existing[k] != str(v)}
        if new:
            self._mlflow.log_params(new)
        if changed:  # params are immutable in MLflow: record what a resumed run changed as tags
            self._mlflow.set_tags({f"resume.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        self._mlflow.log_image(image, key=key, step=step)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._mlflow.log_dict(dict(data), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_lineage(self, lineage: Mapping[str, Any]) -> None:
        """Store URI / content hash / item count as tags; the full record (with item ids) as lineage.json."""
        self.set_tags(lineage_tags(lineage))
        self.log_dict(lineage, "lineage/lineage.json")

    def log_pipeline(
        self,
        pipeline_dir: str | Path,
        registered_model_name: str | None,
        *,
        lineage: Mapping[str, Any] | None = None,
        pip_requirements: Iterable[str] | None = None,
    ) -> str | None:
        """Log the pipeline folder as the MLflow pyfunc model `pipeline`; register it when a name is given.

        Returns the registered model version (str) or None.
        """
        import mlflow.pyfunc

        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=str(PYFUNC_CODE),
            artifacts={"pipeline": str(pipeline_dir)},
            signature=pyfunc_signature(),
            pip_requirements=list(pip_requirements or _pip_requirements()),
            registered_model_name=registered_model_name,
            tags=lineage_tags(lineage) if lineage else None,
        )
        self.set_tags({"dsat.model_uri": info.model_uri})
        version = getattr(info, "registered_model_version", None)
        if registered_model_name and version is not None:
            client = self._mlflow.MlflowClient()
            for key, value in lineage_tags(lineage or {}).items():
                client.set_model_version_tag(registered_model_name, str(version), key, value)
            client.set_registered_model_alias(registered_model_name, CANDIDATE_ALIAS, str(version))
        return None if version is None else str(version)

    def end(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def pyfunc_signature() -> ModelSignature:
    """The `mlflow.models.ModelSignature` of the pyfunc model (see `mlflow_pyfunc_model.py`).

    Rows: a required `prompt` string and optional metadata columns. These are typed Any: MLflow refuses an
    int64 column for a double (e.g. lat=52) and a column with a missing value becomes float NaN (year).
    Output: uint8 images (N, H, W, 3). Params: `PREDICT_DEFAULTS`.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from mlflow.types.schema import AnyType

    from dsat_core.metadata import FIELD_NAMES

    columns = [ColSpec("string", "prompt")] + [ColSpec(AnyType(), n, required=False) for n in FIELD_NAMES]
    params = [
        ParamSpec(name, "long" if isinstance(value, int) else "double", value)
        for name, value in PREDICT_DEFAULTS.items()
    ]
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema(params),
    )


CANDIDATE_ALIAS = "candidate"
"""Alias of the newest trained version; `evaluate` promotes an evaluated version (e.g. to `champion`)."""


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    return {
        "dsat.store_uri": str(lineage.get("store_uri")),
        "dsat.store_content_hash": str(lineage.get("content_hash")),
        "dsat.product": str(lineage.get("product")),
        "dsat.n_items": str(len(lineage.get("item_ids", []))),
        "dsat.n_tiles": str(lineage.get("n_tiles")),
    }


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "diffusers", "transformers", "safetensors", "numpy", "pandas"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def default_tracking_uri(output_dir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite database in the output folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    import subprocess

    folder = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
