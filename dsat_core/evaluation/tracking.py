"""MLflow side of an evaluation: resolve a model URI to a local pipeline folder, and one run to log into.

Everything goes through an explicit `MlflowClient` and run id (no fluent "active run"), so it is safe in
worker threads (Prefect tasks) and never touches another run of the same process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsat_core.training.mlflow_logging import experiment_id as get_experiment_id

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value (characters)


@dataclass
class ModelSource:
    """A pipeline folder on local disk and where it came from.

    ``uri``: what was asked for (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/path`` or the
    folder); ``version``: the registered model version, else the run id, else ``"local"``.
    """

    path: Path
    uri: str
    version: str
    run_id: str | None = None


def find_pipeline_dir(root: str | Path) -> Path:
    """The folder under ``root`` holding ``model_index.json``: ``root`` itself, a pyfunc model's
    ``artifacts/pipeline`` (as `MlflowTracker.log_pipeline` writes it), or the shallowest one found."""
    root = Path(root)
    for candidate in (root, root / "artifacts" / "pipeline", root / "pipeline"):
        if (candidate / "model_index.json").is_file():
            return candidate
    found = sorted(root.rglob("model_index.json"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"{root}: no saved pipeline (model_index.json) in the downloaded model")
    return found[0].parent


_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/.*)?$")


def resolve_model(model_uri: str, dst_dir: str | Path, tracking_uri: str) -> ModelSource:
    """Download ``models:/...`` or ``runs:/...`` into ``dst_dir`` (a local folder is used in place)."""
    import mlflow
    from mlflow import MlflowClient

    if not model_uri.startswith(("models:/", "runs:/")):
        path = Path(model_uri).expanduser()
        if "://" in model_uri or not path.is_dir():
            raise ValueError(
                f"model {model_uri!r}: expected models:/<name>@<alias>, models:/<name>/<version>, "
                "runs:/<run_id>/<path> or a local pipeline folder"
            )
        return ModelSource(find_pipeline_dir(path), str(path.resolve()), "local")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version, run_id = None, None
    if (match := _MODELS.match(model_uri)) is not None:
        name = match["name"]
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        elif match["version"] == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"{model_uri}: registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, match["version"])
        version, run_id = str(mv.version), mv.run_id
    elif (match := _RUNS.match(model_uri)) is not None:
        run_id = match["run_id"]
        version = run_id
    else:
        raise ValueError(f"cannot parse model URI {model_uri!r}")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
    )
    return ModelSource(find_pipeline_dir(local), model_uri, version, run_id)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts → ``a.b`` keys; values as strings (lists / dicts as JSON), None left out."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_VALUE_LIMIT]
    return out


class EvaluationRun:
    """One MLflow run of an evaluation, addressed by id (see module docstring).

    ``parent_run_id`` nests the run under another (tag ``mlflow.parentRunId``). ``artifact_location`` is
    used only when the experiment is created (e.g. a local folder next to a sqlite tracking database).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str | None = "evaluate",
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        experiment_id = None
        if parent_run_id:
            try:
                parent = self.client.get_run(parent_run_id)
            except Exception as err:  # MlflowException; its message names the run
                raise ValueError(f"parent run {parent_run_id} not found on {tracking_uri}: {err}") from None
            all_tags["mlflow.parentRunId"] = parent_run_id
            if experiment is None:  # nested runs show under their parent in the parent's experiment
                experiment_id = parent.info.experiment_id
        if experiment_id is None:
            experiment_id = get_experiment_id(self.client, experiment or "evaluate", artifact_location)
        self.experiment_id = experiment_id
        self.run_id = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_table(self, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(columns), artifact_file=artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


__all__ = ["EvaluationRun", "ModelSource", "find_pipeline_dir", "flatten_params", "resolve_model"]


def registered_model_name(uri: str) -> str | None:
    """`name` of `models:/name@alias` / `models:/name/3`; None for run URIs and folders."""
    if not uri.startswith("models:/"):
        return None
    rest = uri.removeprefix("models:/")
    return rest.split("@", 1)[0] if "@" in rest else rest.split("/", 1)[0]
