"""Sampling overhead of DiffusionSatPipeline vs a plain diffusers denoising loop.

Both sides use the same UNet weights (the baseline is a `UNet2DConditionModel` without the metadata path),
the same text encoder, VAE, scheduler (DDIM, v-prediction), number of steps, batch and text guidance.
The SatUNet's metadata path is zero-initialised, so both produce the same images: the script checks it.
The pipeline also gets metadata with missing fields, so its metadata embedding runs every step.

    python bench/sample.py                        # tiny UNet, 16x16 latents, batch 2, 20 steps, 1 CPU thread
    python bench/sample.py --size small --latent-size 32
    python bench/sample.py --device cuda --dtype bf16 --size sd21-base --latent-size 64 --batch 4

Prints both times (median over repeats, runs interleaved) and their ratio (target: ≤ 1.1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from dsat_core.metadata import SatMetadata
from dsat_core.models import HashTextEncoder, SatUNet, make_tiny_vae, scheduler_config, unet_config
from dsat_core.pipelines import DiffusionSatPipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def plain_loop(
    unet: UNet2DConditionModel,
    text_encoder: HashTextEncoder,
    vae,
    scheduler: DDIMScheduler,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int,
) -> torch.Tensor:
    """The textbook SD sampling loop (text CFG, both branches in one UNet call)."""
    n = len(prompts)
    param = next(unet.parameters())
    states = text_encoder.encode(prompts + [""] * n, param.device).to(param.dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    shape = (n, unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generator, device=param.device, dtype=param.dtype)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        cond, uncond = unet(model_input, t, encoder_hidden_states=states).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample
    assert images.shape[-1] == size * factor
    return (images.float() / 2 + 0.5).clamp(0, 1)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=["tiny", "small", "sd21-base"], default="tiny")
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # casting with .to(dtype) warns once per model
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    config = unet_config(args.size, sample_size=args.latent_size)
    sat_unet = SatUNet(**config).eval()
    plain_unet = UNet2DConditionModel(**config).eval()
    shared = {k: v for k, v in sat_unet.state_dict().items() if not k.startswith("metadata_")}
    plain_unet.load_state_dict(shared)
    text_encoder = HashTextEncoder(hidden_size=config["cross_attention_dim"]).eval()
    vae = make_tiny_vae().eval()
    pipe = DiffusionSatPipeline(
        unet=sat_unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
    pipe.to(device=device, dtype=dtype)
    plain_unet.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    baseline_scheduler = DDIMScheduler.from_config(scheduler_config())

    prompts = [f"a satellite image of a farm number {i}" for i in range(args.batch)]
    metadata = [SatMetadata(lon=10.0 + i, lat=45.0, gsd=0.6, year=2019, month=5) for i in range(args.batch)]

    def run_pipeline(metadata_guidance_scale: float = 1.0) -> torch.Tensor:
        return pipe(
            prompts,
            metadata,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            metadata_guidance_scale=metadata_guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    def run_plain() -> torch.Tensor:
        scale = args.guidance_scale
        sched = baseline_scheduler
        return plain_loop(plain_unet, text_encoder, vae, sched, prompts, args.steps, scale, seed=0)

    # warm-up and equivalence check (zero-initialised metadata path → identical computation)
    diff = (run_pipeline().float() - run_plain().float()).abs().max().item()
    print(f"max |pipeline - plain| = {diff:.2e} (same weights, zero-init metadata path)")

    timings: dict[str, list[float]] = {"plain": [], "pipeline": [], "pipeline+metadata_cfg": []}
    runners = {
        "plain": run_plain,
        "pipeline": run_pipeline,
        "pipeline+metadata_cfg": lambda: run_pipeline(2.0),
    }
    for _ in range(args.repeats):
        for name, runner in runners.items():
            sync()
            start = time.perf_counter()
            runner()
            sync()
            timings[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in timings.items()}
    print(
        f"config: {args.size} UNet, {args.latent_size}x{args.latent_size} latents, batch {args.batch}, "
        f"{args.steps} DDIM steps, text CFG {args.guidance_scale}, {device} {args.dtype}, "
        f"{args.threads} CPU thread(s), median of {args.repeats}"
    )
    print(f"plain diffusers loop:        {median['plain']:.3f} s")
    print(f"DiffusionSatPipeline:        {median['pipeline']:.3f} s")
    print(f"ratio pipeline / plain:      {median['pipeline'] / median['plain']:.3f}  (target <= 1.1)")
    with_cfg = median["pipeline+metadata_cfg"]
    print(f"with metadata CFG (3 branches, reference): {with_cfg:.3f} s = {with_cfg / median['plain']:.2f}x")


if __name__ == "__main__":
    main()
