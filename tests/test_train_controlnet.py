"""train_controlnet: each task trains and resumes exactly, the base stays frozen, MLflow, CLI and torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsat_core.data.store import DatasetStore
from dsat_core.data.synthetic import make_scene_tiles, make_synthetic_store, synthetic_catalog
from dsat_core.data.tasks import TASK_CARD, TASKS, SuperResolutionTask, read_task_card
from dsat_core.training.launch import build_launch_command, run_training_subprocess
from dsat_core.training.train_controlnet import TrainControlNetConfig, main, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    paired = make_synthetic_store(str(root / "paired.zarr"), n_scenes=2, tiles_per_scene=4, size=16,
                                  products=("rgb", "multispectral"))  # fmt: skip
    temporal = DatasetStore.open(
        str(root / "temporal.zarr"), create=True, catalog=synthetic_catalog(("rgb",), 16)
    )
    scenes = [make_scene_tiles(f"place-{d}", n_tiles=2, size=16, date=d) for d in ("2020-01-05", "2020-04-01",
                                                                                 "2020-08-11")]  # fmt: skip
    temporal.commit([temporal.stage(s) for s in scenes])
    return {"sr": paired, "inpaint": paired, "temporal": str(root / "temporal.zarr")}


def tiny_config(store: str, task: str, output_dir: Path, **overrides) -> TrainControlNetConfig:
    base = dict(
        task=task, store_uri=store, output_dir=str(output_dir), model_size="tiny", text_encoder="hash",
        resolution=16, train_batch_size=2, learning_rate=1e-3, max_steps=3, checkpointing_steps=100,
        use_mlflow=False, save_pipeline=False, seed=5, sequence_length=2, lr_warmup_steps=1,
        conditioning_embedding_channels=(8, 16), degradation={"factor": 2, "blur_sigma": 0.8},
        metadata_dropout=0.2, caption_dropout=0.2,
    )  # fmt: skip
    base.update(overrides)
    return TrainControlNetConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_trains_and_resumes_exactly(stores: dict[str, str], task: str, tmp_path: Path) -> None:
    straight = train(tiny_config(stores[task], task, tmp_path / "straight"))
    first = train(tiny_config(stores[task], task, tmp_path / "split", stop_at_step=2))
    assert first.global_step == 2 and first.pipeline_dir is None
    resumed = train(tiny_config(stores[task], task, tmp_path / "split", resume_from_checkpoint="latest"))
    assert straight.global_step == resumed.global_step == 3
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-6)
    a = tmp_path / "straight" / "checkpoint-3"
    b = tmp_path / "split" / "checkpoint-3"
    wa, wb = _weights(a / "unet"), _weights(b / "unet")
    assert wa.keys() == wb.keys() and any(k.startswith("cond_embedding") for k in wa)  # ControlNet3D weights
    # two runs (the resumed one on a reloaded model) may round differently; with lr 1e-3 a missed, repeated or
    # wrongly resumed step moves weights by ~1e-3, a thousand times the tolerance
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6, msg=key)
    ea, eb = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    assert ea.keys() == eb.keys()
    for key in ea:
        torch.testing.assert_close(eb[key], ea[key], rtol=0, atol=1e-6, msg=f"ema:{key}")
    state = json.loads((b / "training_state.json").read_text())
    assert state["task"] == task and state["model"] == "ControlNet3D"
    # the ControlNet moved away from its zero initialisation, gates stayed in [0, 1]
    assert wa["controlnet_mid_block.weight"].abs().sum() > 0
    assert all(0.0 <= float(v) <= 1.0 for k, v in wa.items() if k.startswith("temporal_gates"))


def test_base_model_stays_frozen_and_pipeline_is_registered(stores: dict[str, str], tmp_path: Path) -> None:
    """A saved DiffusionSatPipeline as base; MLflow gets params (incl. the recipe), loss, samples, model."""
    import mlflow

    from dsat_core.pipelines import SatControlNetPipeline, make_tiny_pipeline

    base_dir = tmp_path / "base"
    make_tiny_pipeline(sample_size=8, vae_downsample=2, seed=3).save_pretrained(base_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(stores["sr"], "sr", tmp_path / "run", base_model=str(base_dir), use_mlflow=True,
                      mlflow_tracking_uri=uri, save_pipeline=True, registered_model_name="dsat-sr-controlnet",
                      validation_steps=3, num_validation_samples=2, validation_inference_steps=2)  # fmt: skip
    result = train(cfg)
    assert result.registered_model_version == "1"

    saved = Path(result.pipeline_dir)
    for name in ("unet", "vae", "text_encoder"):
        before, after = _weights(base_dir / name), _weights(saved / name)
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    pipe = SatControlNetPipeline.from_pretrained(saved)
    assert pipe.controlnet.config.conditioning_channels == 4  # blue, green, red, nir08
    # the task card holds the sr task's options, all of them, and gives the trained task back
    card = json.loads((saved / TASK_CARD).read_text())
    degradation = {"factor": 2, "blur_sigma": 0.8, "bands": None, "upsample": "bicubic"}
    assert card == {
        "task": "sr",
        "product": "rgb",
        "cond_product": "multispectral",
        "degradation": degradation,
        "lr_projection_steps": 8,
    }
    assert read_task_card(saved) == cfg.control_task() == SuperResolutionTask(degradation=cfg.degradation)

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["task"] == "sr"
    assert run.data.params["task.degradation.factor"] == "2"
    assert run.data.params["task.degradation.blur_sigma"] == "0.8"
    assert json.loads(run.data.params["task.cond_bands"]) == ["blue", "green", "red", "nir08"]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"controlnet_pipeline", "images", "lineage"} <= artifacts
    version = client.get_model_version("dsat-sr-controlnet", "1")
    assert version.run_id == run.info.run_id and version.tags["dsat.store_content_hash"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=uri)
    assert isinstance(SatControlNetPipeline.from_pretrained(local).controlnet.config.temporal_layers, list)
    assert (tmp_path / "run" / "samples" / "step-000003.png").is_file()


def test_cli_config_and_overrides(
    stores: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(stores["inpaint"], "inpaint", tmp_path / "cli", max_steps=5)
    path = cfg.to_json(tmp_path / "cfg.json")
    assert main(["--config", str(path), "--max_steps", "1", "--mask_kind", "boxes"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["global_step"] == 1
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert saved["mask_kind"] == "boxes" and saved["task"] == "inpaint"
    with pytest.raises(ValueError, match="use_cached_latents"):
        tiny_config(stores["sr"], "sr", tmp_path, use_cached_latents=True)
    with pytest.raises(ValueError, match="balance_by is not supported for ControlNet training yet"):
        tiny_config(stores["sr"], "sr", tmp_path, balance_by="item")


def test_torchrun_two_processes(stores: dict[str, str], tmp_path: Path) -> None:
    cfg = tiny_config(stores["temporal"], "temporal", tmp_path / "ddp", max_steps=2, train_batch_size=1)
    path = cfg.to_json(tmp_path / "cfg.json")
    cmd = build_launch_command("dsat_core.training.train_controlnet", str(path), nproc_per_node=2)
    lines: list[str] = []
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    assert run_training_subprocess(cmd, lines.append, env=env, cwd=str(tmp_path)) == 0, "\n".join(lines[-40:])
    result = json.loads((tmp_path / "ddp" / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2
    hashes = {p.name: p.read_text() for p in (tmp_path / "ddp" / "rank_weights").glob("rank*.sha256")}
    assert set(hashes) == {"rank0.sha256", "rank1.sha256"}
    assert hashes["rank0.sha256"] == hashes["rank1.sha256"]  # both ranks hold the same ControlNet weights
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_rank1.safetensors").is_file()


def test_band_names_come_from_the_store_and_band_dropout_trains_missing_values(
    stores: dict[str, str], tmp_path: Path
) -> None:
    from dsat_core.models.controlnet3d import ControlNet3D
    from dsat_core.training.train_controlnet import conditioning_band_names, drop_bands

    keep = drop_bands(6000, 3, 0.5, torch.Generator().manual_seed(0))
    assert keep.any(dim=1).all()  # a sample always keeps a band
    # each band dropped with p = 0.5, except that one of the 1/8 all-dropped samples' bands comes back
    assert 1 - keep.float().mean().item() == pytest.approx(0.5 - 1 / 24, abs=0.02)
    assert drop_bands(4, 6, 0.0, torch.Generator().manual_seed(0)).all()
    with pytest.warns(UserWarning, match="same band twice"):
        assert conditioning_band_names(["B04", "red"]) is None
    with pytest.raises(ValueError, match="band_dropout"):
        tiny_config(stores["sr"], "sr", tmp_path, band_dropout=1.0)

    missing = {}
    for p in (0.0, 0.5):
        cfg = tiny_config(stores["sr"], "sr", tmp_path / f"bands-{p}", band_dropout=p, max_steps=5,
                          save_pipeline=True, use_ema=False)  # fmt: skip
        controlnet = ControlNet3D.from_pretrained(Path(train(cfg).pipeline_dir) / "controlnet")
        assert controlnet.config.conditioning_bands == ["blue", "green", "red", "nir08"]  # the store's
        missing[p] = controlnet.missing_band_values.detach()
    # zero at the start: only band dropout moves the learned missing values (by ~lr per step once the
    # zero-initialised outputs let a gradient through)
    assert not missing[0.0].any() and (missing[0.5].abs() > 1e-5).sum() >= 2
