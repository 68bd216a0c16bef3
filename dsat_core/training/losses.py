"""Diffusion objective: v-prediction targets and min-SNR-γ weighting in its v-prediction form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def make_noise_scheduler() -> DDPMScheduler:
    """Training scheduler of spec §1: 1000 steps, scaled_linear 0.00085 → 0.012, v-prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def compute_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for each timestep, float32 on the timesteps' device."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    abar = alphas_cumprod[timesteps.long()]
    return (abar / (1.0 - abar)).float()


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str = "v_prediction") -> torch.Tensor:
    """Per-sample loss weight of min-SNR-γ (Hang et al. 2023), expressed for the model's target.

    The ε-form weight is min(SNR, γ)/SNR. A v-prediction MSE equals (SNR + 1) × the ε-MSE in units
    of x0-error, so the same x0-weighting min(SNR, γ) becomes min(SNR, γ)/(SNR + 1) for v.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}")


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Mean-squared error in fp32, min-SNR weighted per sample when `snr_gamma` is set."""
    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    weights = min_snr_weight(compute_snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    return (per_sample * weights).mean()
