"""Prefect flow `evaluate`: a trained pipeline against the held-out tiles of a store, tracked in MLflow.

generation: FID / KID (IS, CLIP when local models are given) of DiffusionSat samples; a ControlNet task
(`dsat_core.data.tasks.TASKS`, its options as training recorded them in ``task.json``): SSIM / PSNR (LPIPS)
of a ControlNet next to the task baseline on the same tiles. Every run also leaves a per-tile table, a sample
grid, a lat/lon quality map, a metadata sensitivity report and a STAC catalog of the model's images, all as
MLflow artifacts, with the store's content hash as lineage. The model is loaded once, on ``device``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, model_validator

from dsat_core.data.store import DatasetStore
from dsat_core.data.tasks import ControlNetTask, TaskName, resolve_task
from dsat_core.evaluation.report import (
    evaluation_markdown,
    evaluation_sensitivity,
    plot_sensitivity,
    sample_grid,
    sensitivity_metrics,
    write_json,
    write_quality_map,
    write_stac,
)
from dsat_core.evaluation.runner import (
    GenerationEval,
    PairedEval,
    evaluate_controlnet,
    evaluate_generation,
    load_pipeline,
)
from dsat_core.evaluation.tracking import EvaluationRun, ModelSource, registered_model_name, resolve_model

Kind = Literal["generation"] | TaskName


class EvaluateParams(BaseModel):
    """What to evaluate, on which data, and where to log it. Give `pipeline_dir` or `model_uri`."""

    pipeline_dir: str | None = Field(None, description="a save_pretrained pipeline folder")
    model_uri: str | None = Field(
        None, description="models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/<path>"
    )
    store_uri: str = Field(..., description="dataset store (local path or s3://...)")
    kind: Kind = "generation"
    product: str = Field("rgb", description="generation: the tiles' product (a ControlNet task has its own)")
    n_samples: int = Field(64, ge=1, description="samples (generation) or tiles (ControlNet tasks)")
    steps: int = Field(20, ge=1, description="sampler steps")
    guidance_scale: float | None = Field(None, description="default 3.0 for generation, 1.0 for ControlNet")
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    split: Literal["train", "holdout"] | None = "holdout"
    holdout_fraction: float = Field(0.1, gt=0.0, le=1.0)
    metrics: list[Literal["fid", "kid", "is", "clip"]] = Field(["fid", "kid"], description="generation only")
    max_real: int | None = Field(None, description="real held-out tiles for FID/KID (default: n_samples)")
    logits_model: str | None = Field(None, description="local TorchScript classifier for Inception Score")
    clip_model: str | None = Field(None, description="local CLIP folder for CLIP score")
    lpips_weights: str | None = Field(None, description="local LPIPS weights for the ControlNet tasks")
    task_options: dict[str, Any] = Field(
        default_factory=dict,
        description="ControlNet tasks: options replacing those training recorded, e.g. {degradation: {...}}",
    )
    resolution: int | None = Field(None, description="ControlNet tasks: resize tiles (default: as stored)")
    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="ControlNet tasks: < 1 starts from the task baseline noised to that fraction (img2img)",
    )
    sensitivity: bool = Field(True, description="metadata sensitivity + robustness report")
    sensitivity_samples: int = Field(8, ge=2, description="samples in the shuffled-metadata robustness check")
    stac: bool = Field(True, description="write the model's images as a STAC catalog")
    map_bin_deg: float = Field(10.0, description="quality map cell size (degrees; divides 180)")
    mlflow_tracking_uri: str | None = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI"),
        description="default $MLFLOW_TRACKING_URI, else sqlite in output_dir",
    )
    experiment: str | None = Field(
        "evaluate", description="None with parent_run_id: the parent's experiment (nesting shows in the UI)"
    )
    parent_run_id: str | None = Field(None, description="nest the evaluation run under this run")
    promote_to: str | None = Field(
        None, description="after a successful run, set this alias (e.g. champion) on the registered version"
    )
    run_name: str | None = None
    output_dir: str = "evaluate-output"
    device: str = "cpu"
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for s3:// stores")

    @model_validator(mode="after")
    def _one_model(self) -> EvaluateParams:
        if (self.pipeline_dir is None) == (self.model_uri is None):
            raise ValueError("give exactly one of pipeline_dir or model_uri")
        if self.kind == "generation" and self.task_options:
            raise ValueError("task_options are options of a ControlNet task, not of generation")
        if self.kind == "generation" and self.strength < 1.0:
            raise ValueError("strength (start from the task baseline) is for ControlNet tasks only")
        return self

    def tracking_uri(self) -> str:
        local = f"sqlite:///{(Path(self.output_dir) / 'mlflow.db').resolve()}"
        return self.mlflow_tracking_uri or local

    def guidance(self) -> float:
        if self.guidance_scale is not None:
            return self.guidance_scale
        return 3.0 if self.kind == "generation" else 1.0


class EvaluateResult(BaseModel):
    mlflow_run_id: str
    metrics: dict[str, float]
    stac_catalog: str | None
    kind: str
    output_dir: str


# ---------------------------------------------------------------------------------------------- tasks
@task(name="start-mlflow-run", cache_policy=NO_CACHE)
def start_run(params: EvaluateParams, lineage: dict[str, Any]) -> EvaluationRun:
    uri = params.tracking_uri()
    local = None
    if uri.startswith("sqlite:") or "://" not in uri:  # keep local artifacts next to the database
        local = (Path(params.output_dir) / "mlartifacts").resolve().as_uri()
    tags = {f"dsat.{k}": v for k, v in lineage.items()}
    tags["dsat.kind"] = params.kind
    return EvaluationRun(
        uri,
        params.experiment,
        run_name=params.run_name or f"evaluate-{params.kind}",
        parent_run_id=params.parent_run_id,
        tags=tags,
        artifact_location=local,
    )


@task(name="store-lineage", cache_policy=NO_CACHE)
def store_lineage(store_uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
    return {"store_uri": store_uri, "store_content_hash": store.content_hash, "store_version": store.version}


@task(name="resolve-model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def fetch_model(params: EvaluateParams, dst: str) -> ModelSource:
    return resolve_model(params.model_uri or str(params.pipeline_dir), dst, params.tracking_uri())


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(params: EvaluateParams, pipeline_dir: str) -> Any:
    """The pipeline on ``params.device``, loaded once for the evaluation and its sensitivity report."""
    from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline

    cls = DiffusionSatPipeline if params.kind == "generation" else SatControlNetPipeline
    return load_pipeline(pipeline_dir, cls, params.device)


def control_task(params: EvaluateParams, pipeline_dir: str) -> ControlNetTask:
    """The task training recorded beside the pipeline (its defaults without a card), with `task_options`."""
    return resolve_task(params.kind, pipeline_dir).with_options(**params.task_options)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def run_evaluation(params: EvaluateParams, pipe: Any, pipeline_dir: str) -> GenerationEval | PairedEval:
    common: dict[str, Any] = dict(
        seed=params.seed,
        batch_size=params.batch_size,
        split=params.split,
        holdout_fraction=params.holdout_fraction,
        device=params.device,
        storage_options=params.storage_options,
    )
    if params.kind == "generation":
        return evaluate_generation(
            pipe,
            params.store_uri,
            product=params.product,
            n_samples=params.n_samples,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance(),
            metrics=tuple(params.metrics),
            max_real=params.max_real,
            logits_model=params.logits_model,
            clip_model=params.clip_model,
            **common,
        )
    return evaluate_controlnet(
        pipe,
        params.store_uri,
        control_task(params, pipeline_dir),
        n=params.n_samples,
        steps=params.steps,
        guidance_scale=params.guidance(),
        resolution=params.resolution,
        strength=params.strength,
        lpips=params.lpips_weights,
        **common,
    )


@task(name="metadata-sensitivity", cache_policy=NO_CACHE)
def run_sensitivity(params: EvaluateParams, pipe: Any, result: GenerationEval | PairedEval) -> dict[str, Any]:
    return evaluation_sensitivity(
        result,
        pipe,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance(),
        seed=params.seed,
        n=params.sensitivity_samples,
    )


@task(name="write-outputs", cache_policy=NO_CACHE)
def write_outputs(
    params: EvaluateParams,
    result: GenerationEval | PairedEval,
    report: dict[str, Any] | None,
    source: ModelSource,
    out_dir: str,
) -> dict[str, str]:
    """Grid, quality map, per-tile rows, sensitivity JSON + chart, STAC catalog (validated) under out_dir."""
    out = Path(out_dir)
    files = {
        "grid": str(out / "samples" / "grid.png"),
        "map": str(write_quality_map(result, out / "maps" / "quality_map.png", params.map_bin_deg)),
        "rows": str(write_json(result.records, out / "tables" / "per_tile.json")),
    }
    Path(files["grid"]).parent.mkdir(parents=True, exist_ok=True)
    sample_grid(result).save(files["grid"])
    if report is not None:
        files["sensitivity_json"] = str(write_json(report, out / "sensitivity" / "sensitivity.json"))
        files["sensitivity_png"] = str(plot_sensitivity(report, out / "sensitivity" / "sensitivity.png"))
    if params.stac:
        catalog, count = write_stac(result, out / "stac", source.uri, source.version)
        if catalog is not None:
            files["stac"] = str(catalog)
            get_run_logger().info("STAC catalog %s: %d objects validated", catalog, count)
    return files


@task(name="log-to-mlflow", cache_policy=NO_CACHE)
def log_to_mlflow(
    run: EvaluationRun,
    params: EvaluateParams,
    result: GenerationEval | PairedEval,
    report: dict[str, Any] | None,
    source: ModelSource,
    files: dict[str, str],
) -> dict[str, float]:
    metrics = {**result.metrics, **(sensitivity_metrics(report) if report else {})}
    run.log_params(
        {
            **params.model_dump(exclude={"mlflow_tracking_uri", "storage_options"}, exclude_none=True),
            "eval": result.params,
        }
    )
    run.log_metrics(metrics)
    tags = {
        "dsat.model_uri": source.uri,
        "dsat.model_version": source.version,
        "dsat.split": params.split,
        "dsat.holdout_fraction": params.holdout_fraction,
        "dsat.n_eval_tiles": result.n_eval_tiles,
    }
    if source.run_id:
        tags["dsat.model_run_id"] = source.run_id
    tags.update({f"dsat.skipped.{k}": v for k, v in result.skipped.items()})
    run.set_tags(tags)
    run.log_table(result.table(), "tables/per_tile.json")
    run.log_artifact(files["grid"], "samples")
    run.log_artifact(files["map"], "maps")
    for key in ("sensitivity_json", "sensitivity_png"):
        if key in files:
            run.log_artifact(files[key], "sensitivity")
    if "stac" in files:
        run.log_artifacts(Path(files["stac"]).parent, "stac")
    run.log_artifact(files["summary"])
    return metrics


@task(name="promote-model")
def promote(params: EvaluateParams, source: ModelSource) -> str:
    """Point alias `params.promote_to` at the evaluated registered model version."""
    name = registered_model_name(source.uri)
    if name is None:
        raise ValueError(f"promote_to={params.promote_to!r} needs a registered model URI, got {source.uri!r}")
    from mlflow import MlflowClient

    MlflowClient(params.tracking_uri()).set_registered_model_alias(name, params.promote_to, source.version)
    return f"models:/{name}@{params.promote_to}"


# ---------------------------------------------------------------------------------------------- flow
@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams) -> EvaluateResult:
    """Evaluate a pipeline on held-out tiles; log metrics, tables, maps, sensitivity and STAC to MLflow."""
    logger = get_run_logger()
    lineage = store_lineage(params.store_uri, params.storage_options)
    run = start_run(params, lineage)
    out_dir = Path(params.output_dir) / run.run_id
    logger.info("MLflow run %s on %s; outputs in %s", run.run_id, params.tracking_uri(), out_dir)
    try:
        source = fetch_model(params, str(out_dir / "model"))
        pipe = load_model(params, str(source.path))
        result = run_evaluation(params, pipe, str(source.path))
        report = run_sensitivity(params, pipe, result) if params.sensitivity else None
        files = write_outputs(params, result, report, source, str(out_dir))
        summary = evaluation_markdown(
            result,
            model_uri=source.uri,
            store_uri=params.store_uri,
            content_hash=lineage["store_content_hash"],
            run_id=run.run_id,
            sensitivity_report=report,
            stac_catalog=files.get("stac"),
        )
        files["summary"] = str(out_dir / "summary.md")
        Path(files["summary"]).write_text(summary)
        metrics = log_to_mlflow(run, params, result, report, source, files)
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    if params.promote_to:
        logger.info("promoted to %s", promote(params, source))
    create_markdown_artifact(key="evaluate-report", markdown=summary, description=f"evaluate {params.kind}")
    return EvaluateResult(
        mlflow_run_id=run.run_id,
        metrics=metrics,
        stac_catalog=files.get("stac"),
        kind=params.kind,
        output_dir=str(out_dir),
    )


if __name__ == "__main__":
    import sys

    evaluate(EvaluateParams.model_validate_json(sys.argv[1]))
