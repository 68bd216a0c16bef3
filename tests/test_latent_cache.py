"""Latent cache: encoded once per VAE, incremental for new tiles, reused by training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsat_core.data.dataset import TileDataset
from dsat_core.data.synthetic import make_synthetic_store
from dsat_core.models import encode_latents, make_tiny_vae
from dsat_core.training.config import TrainConfig
from dsat_core.training.latent_cache import latent_cache_info, precompute_latents, vae_fingerprint


def test_latents_written_once_reused_and_incremental(tmp_path: Path) -> None:
    uri = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=4)
    vae = make_tiny_vae(seed=0)
    vae_id = vae_fingerprint(vae)
    assert vae_fingerprint(make_tiny_vae(seed=0)) == vae_id != vae_fingerprint(make_tiny_vae(seed=1))

    first = precompute_latents(uri, "rgb", vae, batch_size=3)
    assert first.n_tiles == 8 and first.n_encoded == 8 and first.latent_shape == (4, 16, 16)
    info = latent_cache_info(uri, "rgb")
    assert info["vae_id"] == vae_id and info["scaling_factor"] == pytest.approx(0.18215)
    assert info["encoded_tiles"] == 8 and info["shape"] == (8, 4, 16, 16)

    dataset = TileDataset(uri, "rgb", return_latents=True)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(8)])
    expected = encode_latents(vae, pixels)  # scaled posterior mean
    cached = torch.stack([dataset[i]["latents"] for i in range(8)])
    torch.testing.assert_close(cached, expected, rtol=2e-3, atol=2e-3)  # stored as float16

    # same VAE again: nothing to do, array untouched
    assert precompute_latents(uri, "rgb", vae, batch_size=3).n_encoded == 0
    # new tiles committed: only those are encoded
    make_synthetic_store(uri, n_scenes=3, tiles_per_scene=4)
    again = precompute_latents(uri, "rgb", vae, batch_size=3)
    assert again.n_tiles == 12 and again.n_encoded == 4
    assert latent_cache_info(uri, "rgb")["encoded_tiles"] == 12
    torch.testing.assert_close(TileDataset(uri, "rgb", return_latents=True)[3]["latents"], cached[3])
    # another VAE: everything re-encoded
    other = precompute_latents(uri, "rgb", make_tiny_vae(seed=1), batch_size=8)
    assert other.n_encoded == 12 and latent_cache_info(uri, "rgb")["vae_id"] != vae_id


def test_training_with_cached_latents_matches_vae_on_the_fly(tmp_path: Path) -> None:
    from dsat_core.training.train_diffusionsat import train

    uri = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=4)
    base = dict(
        store_uri=uri,
        model_size="tiny",
        text_encoder="hash",
        resolution=32,
        train_batch_size=2,
        learning_rate=1e-3,
        max_steps=3,
        use_mlflow=False,
        save_pipeline=False,
        seed=3,
    )
    train(TrainConfig(output_dir=str(tmp_path / "cached"), use_cached_latents=True, **base))
    info = latent_cache_info(uri, "rgb")
    assert info is not None and info["encoded_tiles"] == 8 and info["resolution"] == 32
    train(TrainConfig(output_dir=str(tmp_path / "fresh"), use_cached_latents=False, **base))
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("cached", "fresh")
    ]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-2)  # same batches/noise; only fp16 rounding
    # a second cached run finds the cache complete and leaves it as it is
    before = latent_cache_info(uri, "rgb")
    train(TrainConfig(output_dir=str(tmp_path / "cached2"), use_cached_latents=True, **base))
    assert latent_cache_info(uri, "rgb") == before
