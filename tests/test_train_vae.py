"""The small offline VAE trained on store tiles."""

import torch

from dsat_core.data.synthetic import make_synthetic_store
from dsat_core.models.vae import decode_latents, encode_latents, load_vae
from dsat_core.training.train_vae import VAETrainConfig, train_vae


def test_vae_learns_to_reconstruct_and_is_calibrated(tmp_path):
    store = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=8, size=32)
    result = train_vae(VAETrainConfig(store, str(tmp_path / "vae"), max_steps=60, batch_size=8))
    assert result.final_loss < 0.6 * result.first_loss

    vae = load_vae(result.vae_dir)
    assert vae.config.scaling_factor == result.scaling_factor
    from dsat_core.data.dataset import TileDataset

    pixels = torch.stack([TileDataset(store)[i]["pixel_values"] for i in range(8)])
    latents = encode_latents(vae, pixels)
    assert 0.7 < float(latents.std()) < 1.3  # scaled to unit variance
    assert float((decode_latents(vae, latents) - pixels).abs().mean()) < 0.25
