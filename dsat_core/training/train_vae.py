"""Train the small offline-default VAE on the store's tiles (no SD weights needed).

An `AutoencoderKL` (`dsat_core.models.vae.offline_vae_config`: ×2 downsampling, 4 latent channels, no
attention) learns to reconstruct random crops of the train-split tiles, with random flips. Loss:
L1 + ``ssim_weight`` · (1 − SSIM) + ``grad_weight`` · L1 of the image gradients + ``kl_weight`` · KL, AdamW
with a linear warm-up and a cosine decay to 10 %. Afterwards its `scaling_factor` is set to 1 / std of the
latents of the training tiles (as SD did for its VAE), so the diffusion model sees unit-variance latents.

The result is a normal diffusers VAE folder (`save_pretrained`: safetensors + config.json) that
`TrainConfig.vae` accepts, with `train_result.json` (config, loss history, the store's content hash and the
train tiles' items) beside it; with ``mlflow_tracking_uri`` the same goes to an MLflow run (params, metrics,
lineage). `python -m dsat_core.training.train_vae --help` runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchmetrics.functional.image import structural_similarity_index_measure

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore
from dsat_core.models.vae import encode_latents, load_vae, make_offline_vae
from dsat_core.training.config import BalanceBy
from dsat_core.training.sampler import balanced_weights, tile_groups

logger = logging.getLogger("dsat_core.training")


@dataclass
class VAETrainConfig:
    store_uri: str
    output_dir: str
    product: str = "rgb"
    resolution: int | None = None
    crop_size: int | None = 32
    downsample: int = 2
    block_out_channels: tuple[int, ...] = (16, 32)
    norm_num_groups: int = 8
    max_steps: int = 300
    max_seconds: float | None = None  # stop (and save) after this much wall-clock time, if earlier
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    ssim_weight: float = 0.1
    grad_weight: float = 0.1
    holdout_fraction: float = 0.1
    seed: int = 0
    balance_by: BalanceBy | None = None  # sample each item / platform equally often (with replacement)
    init_from: str | None = None  # continue from the weights of a VAE folder (a fresh optimizer and schedule)
    # train only the decoder of the `init_from` VAE: its encoder and scaling factor, hence every latent a
    # diffusion model was trained on, stay as they are (new scenes reconstructed better, no retraining)
    decoder_only: bool = False
    log_every: int = 50
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "diffusionsat-vae"


@dataclass
class VAETrainResult:
    vae_dir: str
    steps: int
    first_loss: float
    final_loss: float
    scaling_factor: float
    history: list[dict[str, float]] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 0  # steps of this run plus those of the runs it continued (`init_from`)
    mlflow_run_id: str | None = None
    previous_runs: list[dict[str, Any]] = field(default_factory=list)


def _dataset(config: VAETrainConfig) -> TileDataset:
    dataset = TileDataset(
        config.store_uri,
        config.product,
        resolution=config.resolution,
        split="train",
        holdout_fraction=config.holdout_fraction,
    )
    if len(dataset) == 0:
        raise ValueError(f"{config.store_uri}: product {config.product!r} has no tiles to train a VAE on")
    return dataset


def _loader(dataset: TileDataset, config: VAETrainConfig, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    if shuffle and config.balance_by:
        weights = balanced_weights(tile_groups(dataset, config.balance_by))
        sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
        return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=False)
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=shuffle, generator=generator, drop_last=False
    )


def _augment(pixels: torch.Tensor, crop: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random crop (same place for the batch) and random horizontal / vertical flips per sample."""
    _, _, h, w = pixels.shape
    if crop is not None and crop < min(h, w):
        top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
        pixels = pixels[:, :, top : top + crop, left : left + crop]
    flip_h = torch.rand(len(pixels), generator=generator) < 0.5
    flip_v = torch.rand(len(pixels), generator=generator) < 0.5
    pixels = torch.where(flip_h[:, None, None, None], pixels.flip(-1), pixels)
    return torch.where(flip_v[:, None, None, None], pixels.flip(-2), pixels).contiguous()


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, ssim_weight: float, grad_weight: float
) -> torch.Tensor:
    """L1 + ssim_weight · (1 − SSIM) + grad_weight · L1 of the x / y differences (images in [-1, 1])."""
    loss = (recon - target).abs().mean()
    if ssim_weight:
        ssim = structural_similarity_index_measure((recon + 1) / 2, (target + 1) / 2, data_range=1.0)
        assert isinstance(
            ssim, torch.Tensor
        )  # a tuple only with return_full_image / return_contrast_sensitivity
        loss = loss + ssim_weight * (1 - ssim)
    if grad_weight:
        loss = loss + grad_weight * _gradient_l1(recon, target)
    return loss


def _gradient_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the horizontal and of the vertical pixel differences."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _lr_lambda(config: VAETrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _lineage(config: VAETrainConfig, dataset: TileDataset) -> dict[str, Any]:
    store = DatasetStore.open(config.store_uri, read_only=True)
    return {
        "store_uri": config.store_uri,
        "product": config.product,
        "content_hash": store.content_hash,
        "split": {"split": "train", "holdout_fraction": config.holdout_fraction},
        "n_tiles": len(dataset),
        "item_ids": sorted(set(dataset.item_ids)),
    }


def _tracker(config: VAETrainConfig):
    from dsat_core.training.mlflow_logging import MlflowTracker, NullTracker

    if not config.mlflow_tracking_uri:
        return NullTracker()
    return MlflowTracker(config.mlflow_tracking_uri, config.mlflow_experiment, run_name="train-vae")


def _trained_parameters(vae, config: VAETrainConfig) -> list[torch.nn.Parameter]:
    """All of the VAE's parameters, or with `decoder_only` those after the latent (the rest frozen)."""
    if not config.decoder_only:
        return list(vae.parameters())
    vae.requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for param in decoder:
        param.requires_grad_(True)
    return decoder


def _fit(vae, dataset: TileDataset, config: VAETrainConfig, tracker) -> list[dict[str, float]]:
    """The training loop: returns the loss history (mean of each `log_every` steps)."""
    optimizer = torch.optim.AdamW(_trained_parameters(vae, config), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict[str, float]] = []
    window: list[float] = []
    step = 0
    start = time.monotonic()
    vae.train()
    loader = _loader(dataset, config, shuffle=True)  # one loader: each epoch draws a new order
    while step < config.max_steps:
        for batch in loader:
            pixels = _augment(batch["pixel_values"], config.crop_size, generator)
            with torch.set_grad_enabled(not config.decoder_only):
                posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
            rec = reconstruction_loss(recon, pixels, config.ssim_weight, config.grad_weight)
            loss = rec + config.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            window.append(loss.item())
            over_time = config.max_seconds is not None and time.monotonic() - start > config.max_seconds
            if over_time or step == 1 or step % config.log_every == 0 or step == config.max_steps:
                mean = sum(window) / len(window)
                history.append({"step": step, "loss": mean})
                tracker.log_metrics({"loss": mean, "lr": schedule.get_last_lr()[0]}, step=step)
                logger.info("vae step %d loss %.4f", step, mean)
                window = []
            if over_time:
                logger.info("vae: time budget of %.0f s spent at step %d", config.max_seconds, step)
                return history
            if step >= config.max_steps:
                break
    return history


def _previous_runs(init_from: str | None) -> list[dict[str, Any]]:
    """The runs a continued VAE already went through (from its `train_result.json`), oldest first."""
    record_path = Path(init_from) / "train_result.json" if init_from else None
    if record_path is None or not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    earlier = record.get("previous_runs", [])
    keep = ("steps", "first_loss", "final_loss", "history", "config", "mlflow_run_id")
    return [*earlier, {k: record[k] for k in keep if k in record}]


def _calibrated_scaling(vae, dataset: TileDataset, config: VAETrainConfig) -> float:
    """1 / std of the (unscaled) latents of the training tiles."""
    vae.register_to_config(scaling_factor=1.0)
    latents = torch.cat([encode_latents(vae, b["pixel_values"]) for b in _loader(dataset, config, False)])
    return float(1.0 / latents.std().clamp_min(1e-6))


def train_vae(config: VAETrainConfig) -> VAETrainResult:
    """Train for `max_steps`, calibrate the scaling factor, save to `output_dir`."""
    torch.manual_seed(config.seed)
    if config.decoder_only and not config.init_from:
        raise ValueError("decoder_only trains the decoder of an existing VAE: give init_from")
    if config.init_from:
        vae = load_vae(config.init_from)
    else:
        vae = make_offline_vae(
            config.downsample, config.block_out_channels, config.norm_num_groups, config.seed
        )
    dataset = _dataset(config)
    lineage = _lineage(config, dataset)
    tracker = _tracker(config)
    params = {k: v for k, v in asdict(config).items() if not k.startswith("mlflow")}
    tracker.log_params(params)
    tracker.log_lineage(lineage)
    history = _fit(vae, dataset, config, tracker)
    vae.eval()
    scaling = vae.config.scaling_factor if config.decoder_only else _calibrated_scaling(vae, dataset, config)
    vae.register_to_config(scaling_factor=scaling)
    out = Path(config.output_dir)
    vae.save_pretrained(out, safe_serialization=True)
    previous = _previous_runs(config.init_from)
    steps = int(history[-1]["step"])
    result = VAETrainResult(
        str(out),
        steps,
        history[0]["loss"],
        history[-1]["loss"],
        scaling,
        history,
        lineage,
        total_steps=steps + sum(int(r["steps"]) for r in previous),
        previous_runs=previous,
        mlflow_run_id=tracker.run_id,
    )
    (out / "train_result.json").write_text(json.dumps({**asdict(result), "config": asdict(config)}, indent=1))
    tracker.log_metrics({"scaling_factor": scaling}, step=result.steps)
    tracker.end()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the small offline VAE on a store's tiles")
    parser.add_argument("--store-uri", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--product", default="rgb")
    parser.add_argument(
        "--resolution", type=int, default=None, help="resize tiles first (default: stored size)"
    )
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="continue from this VAE folder's weights")
    parser.add_argument("--balance-by", choices=("platform", "item"), default=None)
    parser.add_argument("--mlflow-tracking-uri", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = vars(parser.parse_args(argv))
    if (threads := args.pop("threads")) is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = train_vae(VAETrainConfig(**args))
    print(json.dumps({k: v for k, v in asdict(result).items() if k not in ("history", "lineage")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
