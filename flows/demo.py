"""The main job end to end on the sample scenes shipped in `catalogs/samples` (CPU, minutes).

A STAC API (rustac) on 127.0.0.1 over every shipped sample scene (`catalogs/samples/catalog-all.json`) →
`refresh-dataset` → `train-diffusionsat` (fine-tunes the shipped 64 px base model, which carries the
offline VAE) → `train-controlnet` (sr) → `evaluate` (generation and sr) → `apply-model` (the SR ControlNet
over a small AOI of a shipped scene: a COG + STAC item), all as Prefect flows under one parent flow
`main-job`, logged to MLflow (sqlite in the output folder) under one parent run.
Rerunning is safe: the store adds nothing new and training resumes from its last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, Field, model_validator

from dsat_core.apply.job import ApplySpec
from dsat_core.data.catalog import CATALOG_DIR
from dsat_core.data.stac_server import serve_static_catalog
from dsat_core.evaluation.report import headline_figures
from dsat_core.models.configs import UNetSize
from dsat_core.models.vae import DEFAULT_VAE_DIR
from dsat_core.pipelines.diffusionsat import pipeline_path
from dsat_core.training.config import TrainConfig
from dsat_core.training.train_controlnet import TrainControlNetConfig
from dsat_core.training.train_vae import VAETrainConfig, VAETrainResult, train_vae
from flows.apply_model import apply_model
from flows.evaluate import EvaluateParams, EvaluateResult, evaluate
from flows.refresh_dataset import RefreshParams, RefreshResult, refresh_dataset
from flows.train_controlnet import TrainControlNetParams, train_controlnet
from flows.train_diffusionsat import TrainDiffusionSatParams, train_diffusionsat
from flows.training import LaunchParams, TrainingRunResult

SAMPLES_CATALOG = CATALOG_DIR / "samples" / "catalog" / "catalog.json"
#: every shipped sample scene (the main and the extra static catalog): water, forest, desert, snow, coast
ALL_SAMPLES_CATALOG = CATALOG_DIR / "samples" / "catalog-all.json"
#: the applied SR mosaic's AOI: about 24 x 24 px (30 m) of the Landsat 8 Rondônia scene
APPLY_AOI = (-63.95, -8.76, -63.9435, -8.7535)
#: the learning rate of what the demo trains from scratch (the SR ControlNet; a UNet without a base model),
#: and the one the shipped base model was trained at
LEARNING_RATE = 5e-4


class DemoParams(BaseModel):
    output_dir: str = "demo-output"
    resolution: int = Field(64, description="training resolution (the sample tiles' 64 px)")
    base_model: str | None = Field(
        "default",
        description='the DiffusionSatPipeline folder train-diffusionsat fine-tunes ("default": the shipped '
        "base model, with the shipped VAE); None: a fresh `model_size` UNet on `vae`",
    )
    model_size: UNetSize = "compact"
    finetune_learning_rate: float = Field(
        5e-5,
        gt=0.0,
        description="train-diffusionsat's learning rate when it fine-tunes base_model, a tenth of the 5e-4 "
        "the base model was trained at (LEARNING_RATE): 200 steps at that rate without EMA undo much of what "
        "the base model learned (bench/base_model.py's scene-type check 0.48 vs 0.62; 0.61 at 5e-5)",
    )
    vae: str = Field(
        "default",
        description='without base_model: "default", the shipped offline VAE, or "train": train one '
        "(vae_steps)",
    )
    vae_steps: int = 300
    train_steps: int = 200
    controlnet_steps: int = 150
    eval_samples: int = Field(
        96,
        description="generated samples (spread over the held-out scenes: 96 cycle the demo store's 29 "
        "held-out tiles about 3.3 times, so a scene with one held-out tile still gets a few samples in the "
        "grid) and the most held-out SR tiles",
    )
    eval_steps: int = 20
    sr_strength: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="SR sampling starts from the bicubic input noised to this fraction of the schedule "
        "(image-to-image; 1.0: from pure noise)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DemoParams:
        if self.base_model is not None and self.vae == "train":
            raise ValueError('vae="train" trains a VAE for a fresh UNet: give base_model=None with it')
        return self


class DemoResult(BaseModel):
    store: RefreshResult
    vae: dict
    diffusionsat: TrainingRunResult
    controlnet_sr: TrainingRunResult
    evaluation: dict[str, EvaluateResult]
    applied_sr: dict = Field(description="the SR mosaic of APPLY_AOI: cog, item, catalog, report")
    mlflow_tracking_uri: str


@task(name="train-vae")
def train_vae_task(config: VAETrainConfig) -> VAETrainResult:
    """The small offline VAE (skipped when the folder already holds one)."""
    done = Path(config.output_dir) / "train_result.json"
    if done.is_file():
        import json

        data = json.loads(done.read_text())
        data.pop("config", None)
        return VAETrainResult(**data)
    return train_vae(config)


EXPERIMENTS = ("main-job", "diffusionsat", "diffusionsat-controlnet", "evaluate", "apply")


def _parent_run(tracking_uri: str, artifacts: Path) -> str:
    """Create the experiments with artifacts beside the database, and open the parent run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    for name in EXPERIMENTS:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).as_uri())
    mlflow.set_experiment("main-job")
    with mlflow.start_run(run_name="main-job") as run:
        return run.info.run_id


@flow(name="main-job", log_prints=True)
def main_job(params: DemoParams = DemoParams()) -> DemoResult:
    logger = get_run_logger()
    out = Path(params.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    parent = _parent_run(tracking_uri, out / "mlartifacts")
    store_uri = str(out / "store.zarr")

    with serve_static_catalog(ALL_SAMPLES_CATALOG, "local-samples") as stac_api:
        logger.info("STAC API over the sample scenes at %s", stac_api)
        store = refresh_dataset(
            RefreshParams(catalog="local-samples", store_uri=store_uri, stac_api=stac_api)
        )

    vae: dict[str, Any]
    if params.base_model is not None:  # its own VAE: the shipped one for the shipped base model
        vae = {
            "vae_dir": str(pipeline_path(params.base_model) / "vae"),
            "source": f"base model {params.base_model}",
        }
    elif params.vae == "train":
        trained = train_vae_task(
            VAETrainConfig(store_uri, str(out / "vae"), max_steps=params.vae_steps, seed=params.seed)
        )
        vae = {"vae_dir": trained.vae_dir, "steps": trained.steps, "final_loss": trained.final_loss}
    else:  # the VAE shipped with the package (trained once on the sample scenes; see its model card)
        vae = {"vae_dir": str(DEFAULT_VAE_DIR), "source": "shipped default (dsat_core/models/default_vae)"}
    learning_rate = params.finetune_learning_rate if params.base_model is not None else LEARNING_RATE
    common = dict(
        store_uri=store_uri,
        resolution=params.resolution,
        vae=vae["vae_dir"],
        model_size=params.model_size,
        seed=params.seed,
        mlflow_tracking_uri=tracking_uri,
        mlflow_parent_run_id=parent,
        use_ema=False,
        lr_warmup_steps=20,
        train_batch_size=8,
        dataloader_num_workers=0,
    )
    diffusionsat = train_diffusionsat(
        TrainDiffusionSatParams(
            train=TrainConfig(
                **common,
                output_dir=str(out / "diffusionsat"),
                init_from=params.base_model,
                learning_rate=learning_rate,
                max_steps=params.train_steps,
                checkpointing_steps=100,
                checkpoints_total_limit=2,
                validation_steps=params.train_steps,
                registered_model_name="diffusionsat-demo",
                mlflow_run_name="train-diffusionsat",
            ),
            launch=LaunchParams(nproc_per_node=1),
        )
    )
    controlnet = train_controlnet(
        TrainControlNetParams(
            train=TrainControlNetConfig(
                **common,
                task="sr",
                base_model=diffusionsat.pipeline_dir,
                output_dir=str(out / "controlnet-sr"),
                learning_rate=LEARNING_RATE,
                max_steps=params.controlnet_steps,
                checkpointing_steps=50,
                checkpoints_total_limit=2,
                validation_steps=params.controlnet_steps,
                registered_model_name="diffusionsat-controlnet-sr-demo",
                mlflow_run_name="train-controlnet-sr",
            ),
            launch=LaunchParams(nproc_per_node=1),
        )
    )
    # Generation is evaluated from the registry (the version training just tagged `candidate`) and, once
    # evaluated, promoted to `champion`; the SR ControlNet straight from its folder.
    sources: dict[str, dict[str, Any]] = {
        "generation": {"model_uri": "models:/diffusionsat-demo@candidate", "promote_to": "champion"},
        "sr": {"pipeline_dir": controlnet.pipeline_dir, "strength": params.sr_strength},
    }
    evaluation = {
        kind: evaluate(
            EvaluateParams(
                **source,
                store_uri=store_uri,
                kind=kind,
                n_samples=params.eval_samples,
                steps=params.eval_steps,
                seed=params.seed,
                mlflow_tracking_uri=tracking_uri,
                parent_run_id=parent,
                output_dir=str(out / f"evaluate-{kind}"),
            )
        )
        for kind, source in sources.items()
    }
    if controlnet.pipeline_dir is None:
        raise RuntimeError("train-controlnet left no pipeline folder to apply")
    applied = apply_sr(controlnet.pipeline_dir, out / "applied-sr", params, tracking_uri)
    return DemoResult(
        store=store,
        vae=vae,
        diffusionsat=diffusionsat,
        controlnet_sr=controlnet,
        evaluation=evaluation,
        applied_sr=applied,
        mlflow_tracking_uri=tracking_uri,
    )


def apply_sr(model_dir: str, out: Path, params: DemoParams, tracking_uri: str) -> dict[str, Any]:
    """The `apply-model` flow: the trained SR ControlNet over `APPLY_AOI` of the multispectral samples, at the
    strength its evaluation used."""
    with serve_static_catalog(SAMPLES_CATALOG, "local-samples") as stac_api:
        spec = ApplySpec(kind="sr", catalog="local-samples", bbox=APPLY_AOI, model=model_dir, out=str(out),
                         stac_api=stac_api, steps=params.eval_steps, strength=params.sr_strength,
                         seed=params.seed, batch_size=16, mlflow_tracking_uri=tracking_uri)  # fmt: skip
        report = apply_model(spec)
    if not report["outputs"]:
        raise RuntimeError(f"apply-model wrote no mosaic: {report['skipped']}")
    item = Path(report["outputs"][0])
    return {"cog": str(item.with_suffix(".tif")), "item": str(item), "catalog": report["catalog"],
            "report": report}  # fmt: skip


def run_demo(output: Path, steps: int | None = None) -> DemoResult:
    """Run `main-job` and print where to look."""
    params = DemoParams(output_dir=str(output))
    if steps is not None:
        params = params.model_copy(update={"train_steps": steps, "controlnet_steps": max(1, steps // 2)})
    result = main_job(params)
    print("\n=== DiffusionSat main job finished ===")
    print(f"store:        {result.store.store_uri} (hash {result.store.content_hash[:12]}…)")
    print(
        f"models:       {result.diffusionsat.pipeline_dir}\n              {result.controlnet_sr.pipeline_dir}"
    )
    for kind, ev in result.evaluation.items():
        headline = {k: v for k, v in ev.metrics.items() if not k.startswith(("sensitivity/", "robustness/"))}
        print(f"evaluate {kind}: " + ", ".join(headline_figures(kind, headline)))  # each with its n
    for kind, ev in result.evaluation.items():
        print(f"{kind} outputs: {ev.output_dir} (samples/grid.png, maps/, sensitivity/, stac/)")
    applied = result.applied_sr
    print(f"applied SR:   {applied['cog']} (COG)\n              {applied['item']} (STAC item)")
    db = result.mlflow_tracking_uri
    print(
        f"MLflow UI:    mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000  → http://127.0.0.1:5000"
    )
    return result
