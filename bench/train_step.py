"""Training-step benchmark: metadata overhead of SatUNet, and cached latents vs VAE on the fly.

1. Step time (forward + backward + AdamW) and peak memory of
     - SatUNet (metadata conditioning),
     - SatUNet(use_metadata=False) (same UNet, no metadata path),
     - diffusers UNet2DConditionModel (plain, same config),
   all in one run with the same config. Target: SatUNet overhead <= 10 % (time and memory) vs the others.
2. Epoch time of the real training loss (`dsat_core.training.train_diffusionsat._loss`) over a synthetic
   store at `--resolution` px with the Stable Diffusion 2.1 VAE architecture (random weights), with
   cached latents vs encoding on the fly. Target: cached >= 1.4x faster.

Step times are medians with the three models interleaved step by step (all three on the device at once:
sd21-base with AdamW needs ~16 GiB each); peak memory is measured with each model alone.

CPU (short):  python bench/train_step.py
GPU:          python bench/train_step.py --device cuda --size sd21-base --resolution 256 \
                  --mixed-precision bf16

Peak memory: CUDA = torch.cuda.max_memory_allocated during the timed steps; CPU = growth of the peak RSS
during the steps, measured in a fresh process per model (CPU has no allocator statistics).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("satunet", "satunet_no_metadata", "diffusers_unet")
MAX_OVERHEAD = 0.10
MIN_CACHE_SPEEDUP = 1.4


def sd21_vae_config(sample_size: int = 512) -> dict[str, Any]:
    """Stable Diffusion 2.1's AutoencoderKL architecture (4 latent channels, /8)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def build_unet(variant: str, size: str, latent: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from dsat_core.models import SatUNet, unet_config

    cfg = unet_config(size, sample_size=latent)
    torch.manual_seed(0)
    if variant == "satunet":
        return SatUNet(use_metadata=True, **cfg)
    if variant == "satunet_no_metadata":
        return SatUNet(use_metadata=False, **cfg)
    if variant == "diffusers_unet":
        return UNet2DConditionModel(**cfg)
    raise ValueError(variant)


class StepRunner:
    """One model + AdamW + fixed random inputs; `step()` is one optimizer step."""

    def __init__(self, variant: str, args: argparse.Namespace):
        self.variant = variant
        self.device = torch.device(args.device)
        latent = args.resolution // 8
        with self.device:  # initialise directly on the device (fast for sd21-base on GPU)
            self.model = build_unet(variant, args.size, latent).train()
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=1e-2)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        gen = torch.Generator().manual_seed(1)
        b, cross = args.batch_size, self.model.config.cross_attention_dim
        self.sample = torch.randn(b, 4, latent, latent, generator=gen).to(self.device)
        self.target = torch.randn(b, 4, latent, latent, generator=gen).to(self.device)
        self.states = torch.randn(b, 77, cross, generator=gen).to(self.device)
        self.t = torch.randint(0, 1000, (b,), generator=gen).to(self.device)
        self.metadata = (torch.rand(b, 7, generator=gen) * 1000).to(self.device)
        self.mask = torch.ones(b, 7, dtype=torch.bool, device=self.device)

    def step(self) -> None:
        kwargs = (
            {}
            if self.variant == "diffusers_unet"
            else {"metadata": self.metadata, "metadata_mask": self.mask}
        )
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pred = self.model(self.sample, self.t, self.states, return_dict=False, **kwargs)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), self.target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        sync()
        tic = time.perf_counter()
        self.step()
        sync()
        return time.perf_counter() - tic


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_memory_child(variant: str, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    runner = StepRunner(variant, args)
    runner.step()  # allocate optimizer state
    gc.collect()
    before = _rss_bytes()
    for _ in range(2):
        runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(max(0, peak - before))


def cpu_peak_memory(variant: str, args: argparse.Namespace) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_memory_child, args=(variant, args, queue))
    proc.start()
    value = queue.get(timeout=1800)
    proc.join()
    return int(value)


def cuda_peak_memory(variant: str, args: argparse.Namespace) -> float:
    """Peak CUDA memory (GiB) of a few steps, with this model alone on the GPU."""
    runner = StepRunner(variant, args)
    for _ in range(args.warmup):
        runner.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        runner.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def bench_steps(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median step time with the variants interleaved step by step (so clock/load drift hits all alike),
    then peak memory of each variant measured alone (CUDA: in this process; CPU: a fresh process each)."""
    memory: dict[str, float] = {}
    if args.device == "cuda" and not args.skip_memory:
        memory = {v: cuda_peak_memory(v, args) for v in VARIANTS}
    runners = {v: StepRunner(v, args) for v in VARIANTS}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for variant, runner in runners.items():
            times[variant].append(runner.timed_step())
    del runners
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    elif not args.skip_memory:
        memory = {v: cpu_peak_memory(v, args) / 2**30 for v in VARIANTS}
    results: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        results[variant] = {"step_s": med, "steps_per_s": 1.0 / med}
        if variant in memory:
            results[variant]["peak_mem_gib"] = memory[variant]
    return results


def bench_epoch(args: argparse.Namespace) -> dict[str, float]:
    """Epoch of the real training loss: VAE on the fly vs cached latents (SD 2.1 VAE architecture)."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from torch.utils.data import DataLoader

    from dsat_core.data.dataset import TileDataset
    from dsat_core.data.synthetic import make_synthetic_store
    from dsat_core.models import SatUNet, load_text_encoder, unet_config
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.latent_cache import CachedLatentDataset, precompute_latents
    from dsat_core.training.losses import make_noise_scheduler
    from dsat_core.training.train_diffusionsat import Components, _loss

    device = torch.device(args.device)
    res = args.resolution
    tmp = Path(tempfile.mkdtemp(prefix="dsat-bench-"))
    uri = make_synthetic_store(
        str(tmp / "store.zarr"), n_scenes=1, tiles_per_scene=args.epoch_tiles, size=res
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(**sd21_vae_config(res)).to(device).eval().requires_grad_(False)
    frozen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    if device.type == "cuda":
        vae.to(dtype=frozen)
    else:
        frozen = torch.float32
    cfg = unet_config(args.size, sample_size=res // 8)
    unet = SatUNet(**cfg).to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    text = load_text_encoder("hash", cross_attention_dim=cfg["cross_attention_dim"]).to(device)
    parts = Components(unet=unet, vae=vae, text_encoder=text.requires_grad_(False), text_projection=None)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    scheduler = make_noise_scheduler()

    def epoch(cached: bool) -> float:
        config = TrainConfig(
            store_uri=uri,
            output_dir=str(tmp),
            resolution=res,
            use_cached_latents=cached,
            mixed_precision=args.mixed_precision,
        )
        tiles = TileDataset(uri, "rgb", resolution=res)
        dataset = CachedLatentDataset(tiles) if cached else tiles  # what train() uses for each setting
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True)
        sync()
        tic = time.perf_counter()
        for k, batch in enumerate(loader):
            gen = torch.Generator().manual_seed(k)
            loss = _loss(batch, gen, unet, parts, scheduler, config, device, frozen, accelerator)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - tic

    sync()
    tic = time.perf_counter()
    precompute_latents(uri, "rgb", vae, batch_size=args.batch_size, resolution=res)
    sync()
    precompute_s = time.perf_counter() - tic
    if args.device == "cuda":  # warm-up epochs (kernel selection, allocator)
        epoch(False)
        epoch(True)
    on_the_fly = epoch(False)
    cached = epoch(True)
    return {
        "tiles": args.epoch_tiles,
        "epoch_s_vae_on_the_fly": on_the_fly,
        "epoch_s_cached_latents": cached,
        "speedup": on_the_fly / cached,
        "precompute_s_once": precompute_s,
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--size",
        default=None,
        choices=("tiny", "small", "sd21-base"),
        help="UNet size (default: small on CPU, sd21-base on CUDA)",
    )
    p.add_argument("--resolution", type=int, default=256, help="pixels (latents are /8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 16 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--epoch-tiles", type=int, default=None, help="tiles in the epoch benchmark (4 CPU, 64 CUDA)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-epoch", action="store_true")
    p.add_argument("--skip-memory", action="store_true", help="CPU: skip the per-model memory subprocesses")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.size = args.size or ("sd21-base" if cuda else "small")
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 5)
    args.epoch_tiles = args.epoch_tiles or (64 if cuda else 4)
    args.threads = args.threads or (
        torch.get_num_threads() if cuda else 1
    )  # CPU: 1 is steadier on shared boxes
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    if cuda:
        out["config"]["gpu"] = torch.cuda.get_device_name()
    print(f"config: {out['config']}")
    failed = False
    if not args.skip_steps:
        steps = bench_steps(args)
        out["steps"] = steps
        print(
            f"\nstep benchmark: size={args.size} {args.resolution}px (latents {args.resolution // 8}), "
            f"batch {args.batch_size}, {args.mixed_precision}, {args.device}"
        )
        for variant, r in steps.items():
            mem = f"{r['peak_mem_gib']:.3f} GiB" if "peak_mem_gib" in r else "n/a"
            ms, sps = r["step_s"] * 1000, r["steps_per_s"]
            print(f"  {variant:22s} {ms:9.1f} ms/step  {sps:7.2f} steps/s  peak {mem}")
        sat = steps["satunet"]
        for base in ("satunet_no_metadata", "diffusers_unet"):
            ratio = sat["step_s"] / steps[base]["step_s"]
            ok = ratio <= 1 + MAX_OVERHEAD
            failed |= not ok
            out[f"time_ratio_vs_{base}"] = ratio
            print(f"  time   SatUNet / {base:20s} = {ratio:.3f}  (<= {1 + MAX_OVERHEAD:.2f}) {verdict(ok)}")
            if "peak_mem_gib" in sat and steps[base].get("peak_mem_gib"):
                mratio = sat["peak_mem_gib"] / steps[base]["peak_mem_gib"]
                mok = mratio <= 1 + MAX_OVERHEAD
                failed |= not mok
                out[f"memory_ratio_vs_{base}"] = mratio
                limit = 1 + MAX_OVERHEAD
                print(f"  memory SatUNet / {base:20s} = {mratio:.3f}  (<= {limit:.2f}) {verdict(mok)}")
    if not args.skip_epoch:
        ep = bench_epoch(args)
        out["epoch"] = ep
        ok = ep["speedup"] >= MIN_CACHE_SPEEDUP
        failed |= not ok
        print(
            f"\nepoch benchmark: {ep['tiles']} tiles at {args.resolution}px, SD 2.1 VAE architecture (random)"
        )
        print(f"  VAE on the fly  {ep['epoch_s_vae_on_the_fly']:8.2f} s")
        print(
            f"  cached latents  {ep['epoch_s_cached_latents']:8.2f} s   (one-off precompute "
            f"{ep['precompute_s_once']:.2f} s)"
        )
        print(f"  speedup = {ep['speedup']:.2f}x  (>= {MIN_CACHE_SPEEDUP}x) {verdict(ok)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\noverall: {verdict(not failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
