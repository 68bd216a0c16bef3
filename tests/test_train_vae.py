"""The offline VAE trainer: learns, calibrates its latents, records its data and logs to MLflow."""

import json
from collections import Counter

import mlflow
import pytest
import torch

from dsat_core.data.dataset import TileDataset
from dsat_core.data.synthetic import make_synthetic_store
from dsat_core.models.vae import decode_latents, encode_latents, load_vae, vae_scale_factor
from dsat_core.training.sampler import balanced_weights
from dsat_core.training.train_vae import (
    VAETrainConfig,
    _loader,
    reconstruction_loss,
    train_vae,
)


def test_vae_learns_to_reconstruct_and_is_calibrated(tmp_path, mlflow_server):
    store = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=8, size=32)
    config = VAETrainConfig(
        store,
        str(tmp_path / "vae"),
        max_steps=60,
        batch_size=8,
        crop_size=16,
        mlflow_tracking_uri=mlflow_server,
    )
    result = train_vae(config)
    assert result.final_loss < 0.6 * result.first_loss
    assert [h["step"] for h in result.history][-1] == 60

    vae = load_vae(result.vae_dir)
    assert vae_scale_factor(vae) == 2 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == result.scaling_factor
    train = TileDataset(store, split="train")
    pixels = torch.stack([train[i]["pixel_values"] for i in range(8)])
    latents = encode_latents(vae, pixels)
    assert latents.shape == (8, 4, 16, 16)
    assert 0.7 < float(latents.std()) < 1.3  # scaled to unit variance
    assert float((decode_latents(vae, latents) - pixels).abs().mean()) < 0.25

    # lineage: the store's content hash and the train tiles (never a held-out one), in the folder and MLflow
    record = json.loads((tmp_path / "vae" / "train_result.json").read_text())
    assert record["lineage"]["content_hash"] == train.content_hash
    assert record["lineage"]["n_tiles"] == len(train) < len(TileDataset(store))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.search_runs(client.get_experiment_by_name("diffusionsat-vae").experiment_id)[0]
    assert run.data.tags["dsat.store_content_hash"] == train.content_hash
    assert run.data.params["ssim_weight"] == "0.1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")][-1] == 60
    assert record["mlflow_run_id"] == run.info.run_id

    # a second run continues from the first one's weights and keeps its record
    more = train_vae(
        VAETrainConfig(store, str(tmp_path / "vae2"), max_steps=10, batch_size=8, init_from=result.vae_dir)
    )
    assert more.total_steps == 70 and more.previous_runs[0]["mlflow_run_id"] == run.info.run_id
    assert more.first_loss < 0.6 * result.first_loss  # starts where the first run ended, not from scratch


def test_reconstruction_loss_terms():
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(reconstruction_loss(target, target, 0.1, 0.1)) < 1e-6
    shifted = target + 0.1  # same structure: only L1 (and a little SSIM luminance) grows, no gradient term
    smooth = torch.zeros_like(target)
    base = float(reconstruction_loss(shifted, target, 0.0, 0.0))
    assert abs(base - 0.1) < 1e-5
    assert float(reconstruction_loss(smooth, target, 0.0, 1.0)) > float(
        reconstruction_loss(smooth, target, 0.0, 0.0)
    )


def test_balanced_sampling_draws_each_group_equally_often(tmp_path):
    weights = balanced_weights(["a", "a", "a", "b"])
    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])

    store = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=8, size=16)
    config = VAETrainConfig(store, str(tmp_path / "vae"), batch_size=4, balance_by="item")
    dataset = TileDataset(store, split="train")
    loader = _loader(dataset, config, shuffle=True)
    epochs = [[i for b in loader for i in b["item_id"]] for _ in range(40)]
    assert all(len(e) == len(dataset) for e in epochs) and epochs[0] != epochs[1]  # a new draw each epoch
    shares = Counter(i for e in epochs for i in e)
    assert set(shares) == set(dataset.item_ids) and len(shares) == 2
    assert abs(shares.most_common()[0][1] / sum(shares.values()) - 0.5) < 0.08

    with pytest.raises(ValueError, match="balance_by 'sensor'"):
        _loader(dataset, VAETrainConfig(store, "x", balance_by="sensor"), shuffle=True)


def test_decoder_only_keeps_the_encoder_and_its_latents(tmp_path):
    """`decoder_only` trains the decoder of `init_from`; every latent (encoder + scaling) stays as it was."""
    store = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=8, size=32)
    first = train_vae(VAETrainConfig(store, str(tmp_path / "vae"), max_steps=30, batch_size=8, crop_size=16))
    tuned = train_vae(
        VAETrainConfig(
            store,
            str(tmp_path / "dec"),
            max_steps=30,
            batch_size=8,
            crop_size=16,
            init_from=first.vae_dir,
            decoder_only=True,
        )
    )
    before, after = load_vae(first.vae_dir), load_vae(tuned.vae_dir)
    assert after.config.scaling_factor == before.config.scaling_factor
    pixels = torch.stack([TileDataset(store, split="train")[i]["pixel_values"] for i in range(4)])
    torch.testing.assert_close(
        encode_latents(after, pixels), encode_latents(before, pixels), rtol=1e-4, atol=1e-5
    )
    moved = [
        float((b - a).abs().max())
        for (name, a), b in zip(after.state_dict().items(), before.state_dict().values(), strict=True)
        if name.startswith("decoder.")
    ]
    assert max(moved) > 1e-4  # the decoder did train

    with pytest.raises(ValueError, match="init_from"):
        train_vae(VAETrainConfig(store, str(tmp_path / "x"), decoder_only=True))
