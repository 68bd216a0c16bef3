"""dsat_core.training: exact resume, loss on real tiles, 2-process DDP, rotation, min-SNR, dropout, MLflow."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsat_core.training.checkpointing import list_checkpoints
from dsat_core.training.conditioning import drop_caption, drop_metadata, split_caption
from dsat_core.training.config import TrainConfig
from dsat_core.training.launch import build_launch_command, run_training_subprocess
from dsat_core.training.losses import (
    compute_snr,
    diffusion_target,
    make_noise_scheduler,
    min_snr_weight,
)

REPO = Path(__file__).resolve().parents[1]
REAL_TIF = REPO.parent / "shared" / "data" / "real" / "landsat7_etm_bahamas_rgb_300m.tif"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dsat_core.data.synthetic import make_synthetic_store

    return make_synthetic_store(
        str(tmp_path_factory.mktemp("store") / "store.zarr"), n_scenes=2, tiles_per_scene=4
    )


def tiny_config(store: str, output_dir: Path, **overrides) -> TrainConfig:
    base = dict(
        store_uri=store,
        output_dir=str(output_dir),
        model_size="tiny",
        text_encoder="hash",
        resolution=32,
        train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler="constant_with_warmup",
        max_steps=4,
        checkpointing_steps=100,
        use_mlflow=False,
        save_pipeline=False,
        seed=7,
    )
    return TrainConfig(**{**base, **overrides})


def no_pickles(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth", ".ckpt")]


# ---------------------------------------------------------------------------- (1) exact resume
def test_resume_matches_uninterrupted_run(store: str, tmp_path: Path) -> None:
    from dsat_core.training.train_diffusionsat import train

    common = dict(
        max_steps=8,
        checkpointing_steps=4,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        use_ema=True,
        ema_decay=0.9,
        caption_dropout=0.3,
        metadata_dropout=0.5,
    )
    interrupted = tiny_config(store, tmp_path / "a", stop_at_step=4, **common)
    first = train(interrupted)
    assert first.global_step == 4
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-4"]
    resumed = train(interrupted.model_copy(update={"stop_at_step": None, "resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 8
    straight = train(tiny_config(store, tmp_path / "b", **common))
    assert straight.global_step == 8

    a, b = tmp_path / "a" / "checkpoint-8", tmp_path / "b" / "checkpoint-8"
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "unet_ema/diffusion_pytorch_model.safetensors",
    ):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and ta, name
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-7, msg=f"{name}:{key}")
    sa = json.loads((a / "training_state.json").read_text())
    sb = json.loads((b / "training_state.json").read_text())
    for key in ("global_step", "lr_scheduler", "optimizer", "micro_batches_seen"):
        assert sa[key] == sb[key], key
    assert sa["last_loss"] == pytest.approx(sb["last_loss"], rel=1e-6)
    # the EMA really moved away from the weights and the weights away from their start
    ema, weights = load_file(a / "ema.safetensors"), load_file(a / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(ema[k], weights[k]) for k in ema)
    start = load_file(tmp_path / "a" / "checkpoint-4" / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], weights[k]) for k in start)
    # nothing pickled anywhere
    assert no_pickles(tmp_path) == []


# ---------------------------------------------------------------------------- (2) loss falls on real tiles
def bahamas_store(path: Path, tile: int = 32, max_tiles: int = 48) -> str:
    """Tiles of the real Landsat 7 Bahamas RGB scene, cut with rasterio and written through the store API."""
    import rasterio
    from pyproj import Transformer

    from dsat_core.data.store import DatasetStore
    from dsat_core.data.tiles import ProductTiles, SceneTiles
    from dsat_core.metadata import SatMetadata

    item_id = "landsat7-etm-bahamas-rgb"
    images, metas, windows, transforms = [], [], [], []
    with rasterio.open(REAL_TIF) as src:
        data = src.read()  # (3, 718, 791) uint8, 0 = nodata
        to_lonlat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        for row in range(0, src.height - tile + 1, tile):
            for col in range(0, src.width - tile + 1, tile):
                block = data[:, row : row + tile, col : col + tile]
                if (block == 0).all(axis=0).mean() > 0.02:
                    continue
                x, y = src.xy(row + tile / 2, col + tile / 2)
                lon, lat = to_lonlat.transform(x, y)
                images.append(block)
                metas.append(SatMetadata(lon=lon, lat=lat, gsd=abs(src.res[0])))  # date/cloud unknown
                windows.append((row, col, tile, tile))
                t = src.transform
                transforms.append(
                    (t.a, t.b, t.c + col * t.a + row * t.b, t.d, t.e, t.f + col * t.d + row * t.e)
                )
        crs = src.crs.to_string()
    step = max(1, len(images) // max_tiles)
    keep = list(range(0, len(images), step))[:max_tiles]
    n = len(keep)
    tiles = ProductTiles(
        product="rgb",
        bands=["red", "green", "blue"],
        images=np.stack([images[i] for i in keep]),
        metadata=[metas[i] for i in keep],
        caption=["a satellite image of coast, in The Bahamas, landsat 7"] * n,
        item_id=[item_id] * n,
        asset_href=[str(REAL_TIF)] * n,
        crs=[crs] * n,
        scene_datetime=[""] * n,
        platform=["landsat-7"] * n,
        transform=np.array([transforms[i] for i in keep], dtype=np.float64),
        window=np.array([windows[i] for i in keep], dtype=np.int64),
        scale_min=np.zeros((n, 3)),
        scale_max=np.full((n, 3), 255.0),
    )
    store = DatasetStore.open(str(path), create=True)
    store.commit([store.stage(SceneTiles(item_id=item_id, products={"rgb": tiles})).key])
    return str(path)


@pytest.mark.skipif(not REAL_TIF.is_file(), reason=f"real imagery not found at {REAL_TIF} (../shared absent)")
def test_loss_falls_on_real_tiles(tmp_path: Path) -> None:
    from dsat_core.training.train_diffusionsat import train

    uri = bahamas_store(tmp_path / "bahamas.zarr")
    config = tiny_config(
        uri,
        tmp_path / "run",
        max_steps=100,
        train_batch_size=4,
        use_ema=False,
        lr_scheduler="constant",
        learning_rate=2e-3,
        caption_dropout=0.1,
    )
    result = train(config)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 100 and result.global_step == 100
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.7 * first, (first, last)


# ---------------------------------------------------------------------------- (3) two processes (gloo)
def test_torchrun_two_processes_keeps_weights_in_sync(store: str, tmp_path: Path) -> None:
    """gloo DDP on CPU; MiniLM so the text projection (outside DDP, grads averaged by hand) is checked too."""
    config = tiny_config(
        store,
        tmp_path / "ddp",
        max_steps=3,
        checkpointing_steps=3,
        metadata_dropout=0.2,
        text_encoder="minilm",
    )
    config_path = config.to_json(tmp_path / "cfg.json")
    cmd = build_launch_command(
        "dsat_core.training.train_diffusionsat", str(config_path), nproc_per_node=2, launcher="torchrun"
    )
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    lines: list[str] = []
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    code = run_training_subprocess(cmd, lines.append, env=env, cwd=str(tmp_path))
    assert code == 0, "\n".join(lines[-40:])
    result = json.loads((tmp_path / "ddp" / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 3
    hashes = {p.name: p.read_text() for p in sorted((tmp_path / "ddp" / "rank_weights").iterdir())}
    assert set(hashes) == {"rank0.sha256", "rank1.sha256"}
    assert hashes["rank0.sha256"] == hashes["rank1.sha256"]
    # the saved checkpoint holds exactly those weights, and each rank saved its own RNG state
    from dsat_core.training.train_diffusionsat import weights_sha256

    ckpt = tmp_path / "ddp" / "checkpoint-3"
    saved = {
        f"unet.{k}": v for k, v in load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors").items()
    }
    saved.update(
        {f"text_projection.{k}": v for k, v in load_file(ckpt / "text_projection.safetensors").items()}
    )
    assert weights_sha256(saved) == hashes["rank0.sha256"]
    assert (ckpt / "rng_rank0.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file()


def test_sampler_shards_ranks_and_resumes_mid_epoch() -> None:
    """Ranks see disjoint tiles (so equal DDP weights mean synced grads); resume continues the same order."""
    from dsat_core.training.sampler import ResumableBatchSampler

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    r0 = take(ResumableBatchSampler(8, 2, seed=3, rank=0, world_size=2), 4)
    r1 = take(ResumableBatchSampler(8, 2, seed=3, rank=1, world_size=2), 4)
    assert not set(sum(r0[:2], [])) & set(sum(r1[:2], []))  # epoch 0: disjoint
    assert sorted(sum(r0[:2], []) + sum(r1[:2], [])) == list(range(8))
    assert r0[2:] != r0[:2]  # epoch 1 is reshuffled
    assert take(ResumableBatchSampler(8, 2, seed=3, rank=0, world_size=2, start_batch=3), 1) == [r0[3]]
    with pytest.raises(ValueError, match="fewer than train_batch_size"):
        ResumableBatchSampler(3, 4)


def test_balanced_sampler_draws_each_group_equally_often_and_resumes() -> None:
    """`balance_by`: a scene with 2 of 20 tiles is drawn as often as one with 18; resume keeps the order."""
    from dsat_core.training.sampler import ResumableBatchSampler, balanced_weights

    groups = ["small"] * 2 + ["large"] * 18
    weights = balanced_weights(groups)
    it = iter(ResumableBatchSampler(20, 4, seed=1, weights=weights))
    drawn = [i for _ in range(500) for i in next(it)]
    share = sum(groups[i] == "small" for i in drawn) / len(drawn)
    assert 0.45 < share < 0.55  # uniform sampling would give 0.10
    resumed = next(iter(ResumableBatchSampler(20, 4, seed=1, weights=weights, start_batch=7)))
    assert resumed == drawn[28:32]
    with pytest.raises(ValueError, match="3 sampling weights for 20 items"):
        ResumableBatchSampler(20, 4, weights=[1.0, 1.0, 1.0])


def test_build_launch_command_variants() -> None:
    single = build_launch_command("m.train", "c.json", nproc_per_node=1)
    assert single[1:] == ["-m", "m.train", "--config", "c.json"]
    auto = build_launch_command("m.train", "c.json", nproc_per_node="auto")
    if torch.cuda.device_count() > 1:
        assert f"--nproc_per_node={torch.cuda.device_count()}" in auto
    else:
        assert auto == single
    multi = build_launch_command(
        "m.train", "c.json", nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500"
    )
    assert (
        "--rdzv_endpoint=10.0.0.1:29500" in multi and "--node_rank=1" in multi and "--standalone" not in multi
    )
    acc = build_launch_command("m.train", "c.json", nproc_per_node=2, launcher="accelerate")
    assert "--multi_gpu" in acc and "--num_processes=2" in acc
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        build_launch_command("m.train", "c.json", nproc_per_node=2, nnodes=2)
    lines: list[str] = []
    code = run_training_subprocess(
        [sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"], lines.append
    )
    assert code == 3 and lines == ["a", "b"]


# ---------------------------------------------------------------------------- (4) rotation
def test_checkpoint_rotation_keeps_total_limit(store: str, tmp_path: Path) -> None:
    from dsat_core.training.train_diffusionsat import train

    train(tiny_config(store, tmp_path, max_steps=5, checkpointing_steps=1, checkpoints_total_limit=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------- (6) min-SNR
def test_min_snr_weight_formula_and_meaning() -> None:
    snr = torch.tensor([0.01, 0.5, 1.0, 4.99, 5.0, 7.0, 1000.0])
    gamma = 5.0
    expected = torch.tensor([min(s, gamma) / (s + 1.0) for s in snr.tolist()])
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v_prediction"), expected)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "epsilon"), torch.clamp(snr, max=gamma) / snr)

    # meaning: the weighted v-loss equals the min-SNR-weighted x0-loss, min(SNR, γ)·|x̂0 − x0|²
    scheduler = make_noise_scheduler()
    assert scheduler.config.prediction_type == "v_prediction"
    t = torch.tensor([10, 250, 500, 999])
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(compute_snr(scheduler, t), (abar / (1 - abar)).float())
    gen = torch.Generator().manual_seed(0)
    x0, noise, v_err = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    v = diffusion_target(scheduler, x0, noise, t)
    x_t = scheduler.add_noise(x0, noise, t)
    alpha, sigma = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x0_hat = alpha * x_t - sigma * (v + v_err)  # x0 recovered from a wrong v prediction
    snr_t = compute_snr(scheduler, t)
    v_loss = min_snr_weight(snr_t, gamma) * v_err.pow(2).mean(dim=(1, 2, 3))
    x0_loss = torch.clamp(snr_t, max=gamma) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(v_loss, x0_loss, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- (7) conditioning dropout
def test_metadata_dropout_masks_and_never_zeroes_values() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4000, 7, dtype=torch.bool)
    mask[::3, 4:] = False  # some fields already missing
    dropped = drop_metadata(mask, 0.1, gen)
    assert not (dropped & ~mask).any()  # never turns a missing field present
    fraction = 1 - dropped[mask].float().mean().item()
    assert 0.08 < fraction < 0.12
    assert (dropped.float().mean(dim=0) < mask.float().mean(dim=0)).all()  # per field, not whole rows
    assert 0 < (dropped.sum(1) < mask.sum(1)).float().mean() < 0.6


def _tile_batch(store: str) -> dict:
    from dsat_core.data.dataset import TileDataset

    return torch.utils.data.default_collate([TileDataset(store, "rgb")[i] for i in range(8)])


def _training_loss(unet: torch.nn.Module, parts, config: TrainConfig, batch: dict) -> torch.Tensor:
    """The DiffusionSat training loss of `unet` on `batch` (generator seed 1)."""
    from accelerate import Accelerator

    from dsat_core.training.train_diffusionsat import _loss

    args = (make_noise_scheduler(), config, torch.device("cpu"), torch.float32, Accelerator())
    return _loss(batch, torch.Generator().manual_seed(1), unet, parts, *args)


def _dropout_config(store: str, tmp_path: Path, mode: str) -> TrainConfig:
    return tiny_config(
        store,
        tmp_path,
        metadata_dropout=0.5,
        metadata_dropout_mode=mode,
        caption_dropout=0.0,
        caption_phrase_dropout=0.0,
    )


def test_training_step_passes_dropout_as_mask_not_zero(store: str, tmp_path: Path) -> None:
    """In both modes the UNet sees the dataset's metadata values untouched and the same dropped fields lose
    their mask bit; the mode lives in the UNet (`missing_metadata`), which the trainer sets."""
    from dsat_core.training.train_diffusionsat import build_components

    batch = _tile_batch(store)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, states, metadata=None, metadata_mask=None, return_dict=True):
            seen["last"] = {"metadata": metadata.clone(), "mask": metadata_mask.clone()}
            return (sample * 0 + torch.zeros((), requires_grad=True),)

    for mode in ("learned", "zero"):
        config = _dropout_config(store, tmp_path, mode)
        parts = build_components(config)
        assert parts.unet.config.missing_metadata == mode
        assert parts.unet.metadata_embedding.config.missing_metadata == mode
        assert torch.isfinite(_training_loss(Spy(), parts, config, batch))
        seen[mode] = seen.pop("last")
        torch.testing.assert_close(seen[mode]["metadata"], batch["metadata"])
        assert not (seen[mode]["mask"] & ~batch["metadata_mask"]).any()
        assert (seen[mode]["mask"] != batch["metadata_mask"]).any()
    assert torch.equal(seen["learned"]["mask"], seen["zero"]["mask"])
    with pytest.raises(ValueError, match="metadata_dropout_mode"):
        TrainConfig(store_uri="s", output_dir="o", metadata_dropout_mode="none")


def test_random_dihedral_gives_each_tile_one_of_its_eight_symmetries() -> None:
    from dsat_core.training.augment import N_SYMMETRIES, dihedral, random_dihedral

    tile = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    views = [dihedral(tile, k) for k in range(N_SYMMETRIES)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all distinct
    assert torch.equal(views[0], tile) and torch.equal(views[4], tile.flip(-1))
    assert torch.equal(views[1], tile.transpose(-2, -1).flip(-2))  # a quarter turn, counter-clockwise
    batch = tile.expand(64, -1, -1, -1)
    out = random_dihedral(batch, torch.Generator().manual_seed(0))
    picks = [next(k for k, v in enumerate(views) if torch.equal(o, v)) for o in out]  # each is a symmetry
    assert set(picks) == set(range(8))
    assert torch.equal(random_dihedral(batch, torch.Generator().manual_seed(0)), out)  # from the generator
    with pytest.raises(ValueError, match="square images only"):
        random_dihedral(torch.zeros(1, 1, 4, 6), torch.Generator())


def test_random_flip_rotate_turns_the_tiles_the_vae_encodes(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dsat_core.training.train_diffusionsat as trainer
    from dsat_core.training.augment import N_SYMMETRIES, dihedral

    batch, encoded = _tile_batch(store), []
    encode = trainer.encode_latents
    monkeypatch.setattr(trainer, "encode_latents", lambda vae, px: encoded.append(px) or encode(vae, px))
    for flag in (False, True):
        config = tiny_config(store, tmp_path, random_flip_rotate=flag)
        parts = trainer.build_components(config)
        assert torch.isfinite(_training_loss(parts.unet, parts, config, batch))
    plain, turned = encoded
    torch.testing.assert_close(plain, batch["pixel_values"])
    pairs = zip(plain, turned, strict=True)
    picks = [next(k for k in range(N_SYMMETRIES) if torch.equal(dihedral(x, k), y)) for x, y in pairs]
    assert any(k != 0 for k in picks)  # some tiles turned or mirrored, each into one of its symmetries
    with pytest.raises(ValueError, match="not with cached latents"):
        tiny_config(store, tmp_path, random_flip_rotate=True, use_cached_latents=True)


def test_zero_mode_loss_is_the_reference_zeroed_metadata(store: str, tmp_path: Path) -> None:
    """metadata_dropout_mode="zero" trains exactly as feeding every dropped or missing field as a present 0
    to a learned-mode UNet with the same weights (the reference), and differs from the learned mode."""
    from dsat_core.models.metadata_embedding import set_missing_metadata
    from dsat_core.training.train_diffusionsat import build_components

    batch = _tile_batch(store)
    assert (~batch["metadata_mask"]).any()  # the synthetic store's odd scenes lack cloud cover
    config = _dropout_config(store, tmp_path, "zero")
    parts = build_components(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in parts.unet.metadata_embedding.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    learned = copy.deepcopy(parts.unet)
    set_missing_metadata(learned, "learned")
    seen: dict[str, torch.Tensor] = {}

    class ZeroedReference(torch.nn.Module):
        def forward(self, sample, timestep, states, metadata=None, metadata_mask=None, return_dict=True):
            seen["mask"] = metadata_mask.clone()
            zeroed = metadata.masked_fill(~metadata_mask, 0.0)
            present = torch.ones_like(metadata_mask)
            return learned(
                sample, timestep, states, metadata=zeroed, metadata_mask=present, return_dict=False
            )

    loss_zero = _training_loss(parts.unet, parts, config, batch)
    loss_reference = _training_loss(ZeroedReference(), parts, config, batch)
    assert (batch["metadata"][batch["metadata_mask"] & ~seen["mask"]] != 0).any()  # dropped real values
    torch.testing.assert_close(loss_zero, loss_reference, rtol=1e-6, atol=0)
    assert not torch.allclose(loss_zero, _training_loss(learned, parts, config, batch))


def test_controlnet_follows_dropout_mode_and_base_keeps_its_own(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ControlNet (both metadata embeddings) gets `missing_metadata` = the run's mode, a loaded frozen
    base keeps its saved one, and the step hands both the same mask-only dropout in either mode."""
    from accelerate import Accelerator

    from dsat_core.models import SatUNet, unet_config
    from dsat_core.training import train_controlnet

    SatUNet(missing_metadata="zero", **unet_config("tiny")).save_pretrained(tmp_path / "base")
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def spy(
        unet,
        model,
        noisy,
        timesteps,
        states,
        metadata,
        mask,
        cond,
        cond_metadata,
        cond_mask,
        cond_band_mask=None,
    ):
        seen["last"] = (metadata.clone(), mask.clone(), cond_metadata.clone(), cond_mask.clone())
        return noisy * 0 + torch.zeros((), requires_grad=True)

    monkeypatch.setattr(train_controlnet, "controlled_unet_forward", spy)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1,
        "caption": ["a satellite image"] * 4,
        "metadata": torch.rand(4, 7, generator=gen) * 900 + 100,
        "metadata_mask": torch.ones(4, 7, dtype=torch.bool),
        "cond": torch.rand(4, 4, 2, 32, 32, generator=gen),
        "cond_metadata": torch.rand(4, 2, 7, generator=gen) * 900 + 100,
        "cond_metadata_mask": torch.ones(4, 2, 7, dtype=torch.bool),
    }
    for mode in ("learned", "zero"):
        config = train_controlnet.TrainControlNetConfig(
            task="sr",
            store_uri=store,
            output_dir=str(tmp_path),
            base_model=str(tmp_path / "base"),
            text_encoder="hash",
            metadata_dropout=0.5,
            cond_metadata_dropout=0.5,
            metadata_dropout_mode=mode,
        )
        parts = train_controlnet.build_base(config)
        controlnet = train_controlnet.build_controlnet(config, parts.unet, parts.vae, 4)
        assert parts.unet.config.missing_metadata == "zero"
        assert controlnet.config.missing_metadata == mode
        assert controlnet.metadata_embedding.config.missing_metadata == mode
        assert controlnet.cond_metadata_embedding.config.missing_metadata == mode
        args = (parts, make_noise_scheduler(), config, torch.device("cpu"), torch.float32, Accelerator())
        train_controlnet._loss(batch, torch.Generator().manual_seed(1), controlnet, *args)
        seen[mode] = seen.pop("last")
        metadata, mask, cond_metadata, cond_mask = seen[mode]
        torch.testing.assert_close(metadata, batch["metadata"])
        torch.testing.assert_close(cond_metadata, batch["cond_metadata"])
        assert (~mask).any() and (~cond_mask).any()
    assert all(torch.equal(a, b) for a, b in zip(seen["learned"], seen["zero"], strict=True))


def test_zero_mode_trains_and_never_uses_missing_embeddings(store: str, tmp_path: Path) -> None:
    """A few steps with metadata_dropout_mode="zero": the run finishes, the mode is recorded in the run
    config and the saved UNet config, and no missing embedding ever moves from its zero init (not even
    cloud cover's, which the data lacks); the learned mode moves them."""
    from dsat_core.training.train_diffusionsat import train

    key = "metadata_embedding.missing_embedding"
    missing = {}
    for mode in ("zero", "learned"):
        config = tiny_config(
            store, tmp_path / mode, max_steps=3, metadata_dropout=0.5, metadata_dropout_mode=mode
        )
        result = train(config)
        assert result.global_step == 3 and np.isfinite(result.final_loss)
        saved = json.loads((tmp_path / mode / "train_config.json").read_text())
        assert saved["metadata_dropout_mode"] == config.flat_params()["metadata_dropout_mode"] == mode
        unet_dir = tmp_path / mode / "checkpoint-3" / "unet"
        assert json.loads((unet_dir / "config.json").read_text())["missing_metadata"] == mode
        missing[mode] = load_file(unet_dir / "diffusion_pytorch_model.safetensors")[key]
    assert torch.count_nonzero(missing["zero"]) == 0
    assert torch.count_nonzero(missing["learned"][[0, 1, 2, 4, 5, 6]]) > 0  # fields the data always has


def test_caption_dropout_drops_whole_caption_or_phrases() -> None:
    head, phrases = split_caption("a satellite image of farmland in Germany")
    assert head == "a satellite image" and [p for _, p in phrases] == ["of farmland", "in Germany"]
    head, phrases = split_caption("a satellite image of coast, in The Bahamas, landsat 7")
    assert [p for _, p in phrases] == ["of coast", "in The Bahamas", "landsat 7"]
    gen = torch.Generator().manual_seed(0)
    caption = "a satellite image of farmland in Germany"
    outs = [drop_caption(caption, 0.1, 0.1, gen) for _ in range(3000)]
    assert 0.07 < outs.count("") / len(outs) < 0.13
    assert {"a satellite image in Germany", "a satellite image of farmland", caption} <= set(outs)
    assert all(o == "" or o.startswith("a satellite image") for o in outs)
    assert drop_caption(caption, 0.0, 0.0, gen) == caption


# ---------------------------------------------------------------------------- config / CLI
def test_config_cli_and_json_round_trip(tmp_path: Path) -> None:
    config = TrainConfig(store_uri="s", output_dir=str(tmp_path))
    assert config.weight_decay == 1e-2 and config.snr_gamma == 5.0 and config.ema_decay == 0.9999
    assert (
        config.metadata_dropout == 0.1 and config.caption_dropout == 0.1 and config.text_encoder == "minilm"
    )
    path = config.to_json(tmp_path / "c.json")
    cli = TrainConfig.from_cli(
        [
            "--config",
            str(path),
            "--max_steps",
            "7",
            "--bbox",
            "[0,1,2,3]",
            "--use_ema",
            "false",
            "--mixed_precision",
            "bf16",
            "--stop_at_step",
            "none",
        ]
    )
    assert cli.max_steps == 7 and cli.bbox == (0, 1, 2, 3) and cli.use_ema is False
    assert cli.mixed_precision == "bf16" and cli.stop_at_step is None
    assert TrainConfig.from_json(path) == config
    with pytest.raises(ValueError, match="metadata_dropout"):
        TrainConfig(store_uri="s", output_dir="o", metadata_dropout=1.5)


# ---------------------------------------------------------------------------- MLflow end to end
def test_mlflow_logs_params_metrics_images_lineage_and_registers_pipeline(store: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from dsat_core.data.store import DatasetStore
    from dsat_core.pipelines import DiffusionSatPipeline
    from dsat_core.training.train_diffusionsat import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(
        store,
        tmp_path / "run",
        text_encoder="minilm",
        max_steps=4,
        validation_steps=2,
        num_validation_samples=2,
        validation_inference_steps=2,
        use_mlflow=True,
        mlflow_tracking_uri=uri,
        mlflow_experiment="dsat-test",
        mlflow_run_name="tiny",
        registered_model_name="dsat-tiny",
        save_pipeline=True,
    )
    result = train(config)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["snr_gamma"] == "5.0"
    assert run.data.params["trainable_text_projection"] == "True"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value == pytest.approx(result.final_loss)
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 4
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.endswith(".png") for p in images), images
    hash_ = DatasetStore.open(store, read_only=True).content_hash
    assert run.data.tags["dsat.store_content_hash"] == hash_ and run.data.tags["dsat.store_uri"] == store
    lineage_file = client.download_artifacts(run.info.run_id, "lineage/lineage.json", str(tmp_path))
    lineage = json.loads(Path(lineage_file).read_text())
    assert lineage["item_ids"] == sorted(DatasetStore.open(store, read_only=True).ingested_items())
    versions = client.search_model_versions("name='dsat-tiny'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    assert versions[0].tags["dsat.store_content_hash"] == hash_
    assert result.registered_model_version == str(versions[0].version)
    # the registered model serves images, and the saved pipeline loads back
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/dsat-tiny/1")
    out = model.predict(
        [{"prompt": "a satellite image of forest", "lon": 12.7, "lat": 52.8, "year": 2020}],
        params={"num_inference_steps": 2, "seed": 0},
    )
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    pipe = DiffusionSatPipeline.from_pretrained(result.pipeline_dir)
    assert pipe.unet.config.use_metadata
    assert no_pickles(Path(result.pipeline_dir)) == [] and no_pickles(tmp_path / "run") == []
    assert os.path.isfile(Path(result.output_dir) / "train_result.json")


def test_mlflow_params_never_carry_credentials(tmp_path):
    config = TrainConfig(
        store_uri="s3://bucket/store.zarr",
        output_dir=str(tmp_path),
        storage_options={"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA123", "secret": "s3cr3t"},
    )
    params = config.flat_params()
    assert "s3cr3t" not in str(params) and "AKIA123" not in str(params)
    assert "http://127.0.0.1:9000" in params["storage_options"]
