"""Train the small offline-default VAE on the store's tiles (no SD weights needed).

A tiny `AutoencoderKL` learns to reconstruct the tiles (L1 + a small KL term). Afterwards its
`scaling_factor` is set to 1 / std of the latents of the training tiles (as SD did for its VAE), so the
diffusion model sees unit-variance latents. The result is a normal diffusers VAE folder
(`save_pretrained`: safetensors + config.json) that `TrainConfig.vae` accepts.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dsat_core.data.dataset import TileDataset
from dsat_core.models.vae import encode_latents, make_tiny_vae

logger = logging.getLogger("dsat_core.training")


@dataclass
class VAETrainConfig:
    store_uri: str
    output_dir: str
    product: str = "rgb"
    resolution: int = 32
    downsample: int = 2
    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0


@dataclass
class VAETrainResult:
    vae_dir: str
    steps: int
    first_loss: float
    final_loss: float
    scaling_factor: float


def _loader(config: VAETrainConfig, shuffle: bool) -> DataLoader:
    dataset = TileDataset(config.store_uri, config.product, resolution=config.resolution, split="train")
    if len(dataset) == 0:
        raise ValueError(f"{config.store_uri}: product {config.product!r} has no tiles to train a VAE on")
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=shuffle, generator=generator, drop_last=False
    )


def train_vae(config: VAETrainConfig) -> VAETrainResult:
    """Train for `max_steps`, calibrate the scaling factor, save to `output_dir`."""
    torch.manual_seed(config.seed)
    vae = make_tiny_vae(config.downsample, seed=config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate)
    loader = _loader(config, shuffle=True)
    losses: list[float] = []
    vae.train()
    while len(losses) < config.max_steps:
        for batch in loader:
            pixels = batch["pixel_values"]
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = (reconstruction - pixels).abs().mean() + config.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0:
                logger.info("vae step %d loss %.4f", len(losses), losses[-1])
            if len(losses) >= config.max_steps:
                break
    vae.eval()
    vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        latents = torch.cat([encode_latents(vae, b["pixel_values"]) for b in _loader(config, shuffle=False)])
    scaling = float(1.0 / latents.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling)
    out = Path(config.output_dir)
    vae.save_pretrained(out, safe_serialization=True)
    result = VAETrainResult(str(out), len(losses), losses[0], sum(losses[-10:]) / len(losses[-10:]), scaling)
    (out / "train_result.json").write_text(json.dumps({**asdict(result), "config": asdict(config)}, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the small offline VAE on a store's tiles")
    parser.add_argument("--store-uri", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--product", default="rgb")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    result = train_vae(VAETrainConfig(**vars(parser.parse_args(argv))))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
