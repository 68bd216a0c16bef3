"""Benchmark: a tiny super-resolution ControlNet3D against bicubic upsampling on held-out REAL tiles, through
`dsat_core.evaluation.evaluate_controlnet` (the path `dsat evaluate` / the evaluate flow run), at 4 training
budgets and 2 sampling starts (pure noise, strength 1.0, and image-to-image from bicubic, ``--strength``).

    python bench/controlnet_sr.py --workdir /tmp/dsat-bench-sr     # defaults: ~8 min on 2 quiet cores
    python bench/controlnet_sr.py --workdir /tmp/x --vae-seconds 30 --base-seconds 40 --controlnet-seconds 120

CPU budget (defaults): VAE 90 s + base 120 s + ControlNet 300 s of training, plus 4 evaluations of ~75
held-out tiles × (``--steps`` + round(steps × strength)) DDIM steps; ≤ 20 min on 2 quiet CPU cores.

1. Data: the real reader (`dsat_core.data.reader.read_item`) tiles the multispectral scenes into a store with
   two products read from the same scenes — ``rgb`` (red, green, blue) and ``multispectral`` (blue, green,
   red, nir), 64 px tiles, native grid, percentile scaling: from ../shared/data/real the Sentinel-2 L2A T29RKH
   (Mauritania, 100 m, 289 tiles) and the Landsat 8 scenes Rondonia and Madre de Dios (30 m), and from
   catalogs/samples/extra the Landsat 8 L1TP 016037 scene (900 m). The other shipped scenes are left out:
   catalogs/samples' Landsat 8 scenes and T29RKH crop are the same pixels as ../shared/data/real's (tiles
   would be duplicated across the split), and the Landsat 7 / S2 L1C scenes have no multispectral product.
2. Split: the project's split by tile identity (``split="train"`` / ``"holdout"``, ``--holdout-fraction``
   0.25 so that ≥ 64 tiles are held out): all three models train on the train split, the evaluation runs on
   the held-out split (≥ 2 sensors: Sentinel-2 and Landsat 8).
3. Models: the shipped offline VAE (`dsat_core/models/default_vae`; ``--vae train``: a tiny `AutoencoderKL`,
   4 latents, ×2, trained as an autoencoder for ``--vae-seconds``); a tiny `SatUNet` trained with
   `train_diffusionsat` for ``--base-seconds``; then the SR `ControlNet3D` trained with `train_controlnet`
   (base frozen) for ``--controlnet-seconds``, evaluated after 1/8, 1/4, 1/2 and all of it (the 4
   budgets). Both trainers are run in chunks of steps with ``resume_from_checkpoint="latest"`` (a constant
   learning rate, so chunking does not change the schedule).
4. Task: tiles resized 64 → 32 px (what the models see; 4× cheaper steps than 64 px), then degraded
   multispectral input (DegradationRecipe factor 4, Gaussian σ = 1 px, bands blue, green, red, nir; 32 → 8 px)
   → 32 px RGB.
5. Evaluation (`evaluate_controlnet`, same tiles, same run): PSNR / SSIM / LR-consistency (PSNR between the
   output degraded by the recipe and the input) of the ControlNet and of the task baseline (bicubic of the
   same degraded input), DDIM ``--steps`` steps, guidance 1.0; at strength 1.0 (from noise) and at
   ``--strength`` (SDEdit: bicubic noised to that fraction of the schedule, round(steps × strength) steps).
   The SR task back-projects each output onto its degraded input (`lr_projection_steps`, the task card's
   default); the last budget is also evaluated without it, at ``--strength``. Also the VAE ceiling
   decode(encode(target)) on the same tiles (the best any model in this latent space can do). Prints the
   table per budget and strength with n beside each metric; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from real_scenes import REAL, build_store, log, real_catalog  # noqa: E402

from dsat_core.data.catalog import CatalogConfig  # noqa: E402
from dsat_core.data.tasks import DegradationRecipe, SuperResolutionDataset  # noqa: E402
from dsat_core.evaluation import paired_metrics  # noqa: E402
from dsat_core.models.vae import DEFAULT_VAE_DIR  # noqa: E402

S2_ITEM = "sentinel2-l2a-T29RKH-20200219"
LANDSAT_ITEMS = ["landsat8-oli-sr-rondonia-20190727", "landsat8-oli-sr-madre-de-dios-20180906"]
EXTRA_ITEMS = ["landsat8-oli-l1tp-016037-20170813"]  # another Landsat 8 place, not in ../shared/data/real
BUDGET_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # of --controlnet-seconds: the 4 budgets evaluated
BANDS = ("blue", "green", "red", "nir")
RECIPE = DegradationRecipe(factor=4, blur_sigma=1.0, bands=BANDS)
TILE = 64  # tiles in the store
RESOLUTION = 32  # what the models see: tiles resized 64 → 32 px (4× fewer latents, much cheaper steps)


# ---------------------------------------------------------------------------------------------- data
def catalog() -> CatalogConfig:
    return real_catalog(
        "bench-sr", "real S2 / Landsat scenes read as rgb + multispectral for the SR benchmark", TILE, BANDS
    )


def splits(holdout_fraction: float) -> dict[str, dict]:
    """Dataset filters of the train and held-out splits: the project's split by tile identity."""
    return {name: {"split": name, "holdout_fraction": holdout_fraction} for name in ("train", "holdout")}


# ---------------------------------------------------------------------------------------------- models
def train_vae(store_uri: str, split: dict, out: Path, seconds: float, seed: int = 0) -> dict:
    """Tiny AutoencoderKL (×2) trained on the TRAIN rgb tiles for `seconds` (L1 + MSE + 1e-6 KL)."""
    from dsat_core.models import make_tiny_vae

    if (out / "config.json").is_file():
        return json.loads((out / "train_info.json").read_text())
    ds = SuperResolutionDataset(store_uri, recipe=RECIPE, resolution=RESOLUTION, **split)
    images = torch.stack([ds.target[p]["pixel_values"] for p, _ in ds.pairs])
    vae = make_tiny_vae(2, seed=seed).train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while time.perf_counter() - start < seconds:
        batch = images[torch.randint(0, len(images), (16,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        total = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        steps, loss = steps + 1, total.item()
    vae.eval().save_pretrained(out)
    info = {
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": loss,
        "train_tiles": len(images),
    }
    (out / "train_info.json").write_text(json.dumps(info))
    return info


def run_chunked(train_fn, make_config, seconds: float, chunk: int, done: dict | None = None) -> dict:
    """Call a trainer in chunks of `chunk` steps (resuming) until `seconds` of wall time are spent in all,
    counting the time of an earlier call (``done``, its return) on the same output folder."""
    spent, step = (done["seconds"], done["steps"]) if done else (0.0, 0)
    start, result = time.perf_counter() - spent, None
    while result is None or time.perf_counter() - start < seconds:
        result = train_fn(make_config(step + chunk))
        step = result.global_step
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": result.final_loss,
        "pipeline_dir": result.pipeline_dir,
    }


def common_training(store_uri: str, split: dict, output_dir: Path, max_steps: int) -> dict:
    return dict(
        store_uri=store_uri,
        output_dir=str(output_dir),
        **split,
        resolution=RESOLUTION,
        model_size="tiny",
        text_encoder="hash",
        train_batch_size=8,
        learning_rate=5e-4,
        lr_scheduler="constant",
        max_steps=max_steps,
        checkpointing_steps=10_000,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        use_mlflow=False,
        save_pipeline=True,
        ema_decay=0.99,
        seed=0,
        log_every=25,
    )


def train_base(store_uri: str, split: dict, vae_dir: Path, out: Path, seconds: float) -> dict:
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.train_diffusionsat import train

    def make(max_steps: int) -> TrainConfig:
        return TrainConfig(vae=str(vae_dir), **common_training(store_uri, split, out, max_steps))

    return run_chunked(train, make, seconds, chunk=40)


def train_sr_controlnet(
    store_uri: str, split: dict, base_dir: str, out: Path, seconds: float, done: dict | None = None
) -> dict:
    from dsat_core.training.train_controlnet import TrainControlNetConfig, train

    def make(max_steps: int) -> TrainControlNetConfig:
        return TrainControlNetConfig(
            task="sr",
            base_model=base_dir,
            cond_product="multispectral",
            degradation=RECIPE.to_dict(),
            conditioning_embedding_channels=(16, 32, 96, 256),
            **common_training(store_uri, split, out, max_steps),
        )

    return run_chunked(train, make, seconds, chunk=40, done=done)


# ---------------------------------------------------------------------------------------------- evaluation
METRICS = ("psnr", "ssim", "lr_psnr")


def evaluate(
    store_uri: str, split: dict, pipeline_dir: str, steps: int, strength: float, projection: bool = True
) -> dict:
    """`evaluate_controlnet` on every held-out SR sample: the model and bicubic, side by side, with n;
    ``projection=False``: the model's outputs as sampled (the task's back-projection onto the input off)."""
    from dsat_core.data.tasks import read_task_card
    from dsat_core.evaluation.runner import evaluate_controlnet

    n = len(SuperResolutionDataset(store_uri, recipe=RECIPE, resolution=RESOLUTION, **split))
    task = read_task_card(pipeline_dir)
    assert task is not None, f"{pipeline_dir} has no task card"
    if not projection:
        task = task.with_options(lr_projection_steps=0)
    start = time.perf_counter()
    result = evaluate_controlnet(
        pipeline_dir,
        store_uri,
        task,
        n=n,
        steps=steps,
        strength=strength,
        resolution=RESOLUTION,
        holdout_fraction=split["holdout_fraction"],
        batch_size=16,
    )
    return {
        "metrics": result.metrics,
        "sample_sizes": result.params.get("sample_sizes", {}),
        "sensors": result.params.get("sensors", []),
        "strength": strength,
        "projection": projection,
        "seconds": round(time.perf_counter() - start, 1),
        "per_tile": [
            {k: r[k] for k in ("tile_index", "item_id", "platform", "psnr_model", "psnr_baseline")}
            for r in result.records
        ],
    }


@torch.no_grad()
def vae_ceiling(store_uri: str, split: dict, vae_dir: Path) -> dict:
    """decode(encode(target)) of the tiny VAE on the held-out targets: the best any model here can do."""
    from diffusers import AutoencoderKL

    from dsat_core.models import decode_latents, encode_latents

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    ds = SuperResolutionDataset(store_uri, recipe=RECIPE, resolution=RESOLUTION, **split)
    target = torch.stack([ds.target[p]["pixel_values"] for p, _ in ds.pairs])
    recon = decode_latents(vae, encode_latents(vae, target)).clamp(-1, 1)
    metrics = paired_metrics(recon, target, data_range=(-1.0, 1.0))
    return {"psnr": metrics.mean["psnr"], "ssim": metrics.mean["ssim"], "n": len(target)}


def _cell(metrics: dict, key: str) -> str:
    """``value (n=… tiles, k sensors)`` of one figure (`metric_sample_size`)."""
    from dsat_core.evaluation.metrics import metric_sample_size

    value = metrics.get(key)
    return "—" if value is None else f"{value:7.3f} ({metric_sample_size(key, metrics)})"


def report(results: dict) -> None:
    ceiling = results["vae_ceiling"]
    print("\n=== SR ControlNet vs bicubic on held-out tiles (evaluate_controlnet; higher is better) ===")
    print(
        f"VAE ceiling decode(encode(target)): PSNR {ceiling['psnr']:.2f} SSIM {ceiling['ssim']:.4f} "
        f"(n={ceiling['n']})"
    )
    for row in results["budgets"]:
        print(
            f"\nControlNet budget {row['controlnet']['seconds']:.0f} s ({row['controlnet']['steps']} steps)"
        )
        for ev in row["evaluations"]:
            m = ev["metrics"]
            projection = "" if ev.get("projection", True) else "  WITHOUT back-projection"
            print(f"  strength {ev['strength']:.2f}{projection}  sensors {ev['sensors']}", end="")
            print(f"  ({ev['seconds']:.0f} s)")
            for metric in METRICS:
                print(
                    f"    {metric:<8} model {_cell(m, metric + '/model')}   "
                    f"bicubic {_cell(m, metric + '/bicubic')}"
                )
    print("\ntrend (PSNR model − bicubic, dB):")
    for strength in results["strengths"]:
        gains = [
            f"{ev['metrics']['psnr/gain']:+.2f}"
            for row in results["budgets"]
            for ev in row["evaluations"]
            if ev["strength"] == strength and ev.get("projection", True)
        ]
        print(f"  strength {strength:.2f}: {' → '.join(gains)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsat-bench-controlnet-sr"))
    parser.add_argument(
        "--vae",
        choices=["default", "train"],
        default="default",
        help="default: the shipped VAE (dsat_core/models/default_vae); train: a tiny one, --vae-seconds",
    )
    parser.add_argument("--vae-seconds", type=float, default=90.0)
    parser.add_argument("--base-seconds", type=float, default=120.0)
    parser.add_argument("--controlnet-seconds", type=float, default=300.0, help="the largest of 4 budgets")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps at evaluation")
    parser.add_argument("--strength", type=float, default=0.1, help="the image-to-image start evaluated")
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (REAL / "catalog" / "catalog.json").is_file():
        print(f"real data not found at {REAL}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store_uri = build_store(work / "store.zarr", catalog(), (S2_ITEM, *LANDSAT_ITEMS, *EXTRA_ITEMS))
    split = splits(args.holdout_fraction)
    sizes = {
        k: len(SuperResolutionDataset(store_uri, recipe=RECIPE, resolution=RESOLUTION, **v))
        for k, v in split.items()
    }
    log(f"store ready; SR pairs per split: {sizes}")
    if args.vae == "default":
        vae_dir, vae_info = DEFAULT_VAE_DIR, {"shipped": str(DEFAULT_VAE_DIR)}
    else:
        vae_dir, vae_info = work / "vae", train_vae(store_uri, split["train"], work / "vae", args.vae_seconds)
    log(f"VAE: {vae_info}")
    base_info = train_base(store_uri, split["train"], vae_dir, work / "base", args.base_seconds)
    log(f"base SatUNet: {base_info}")
    strengths = [1.0, args.strength]
    results: dict = {
        "recipe": RECIPE.to_dict(),
        "budget_seconds": {
            "vae": args.vae_seconds,
            "base": args.base_seconds,
            "controlnet": [round(f * args.controlnet_seconds, 1) for f in BUDGET_FRACTIONS],
        },
        "threads": args.threads,
        "training": {"vae": vae_info, "base": base_info},
        "split_sizes": sizes,
        "eval_ddim_steps": args.steps,
        "strengths": strengths,
        "vae_ceiling": vae_ceiling(store_uri, split["holdout"], vae_dir),
        "budgets": [],
    }
    cn_info = None
    for fraction in BUDGET_FRACTIONS:
        cn_info = train_sr_controlnet(
            store_uri,
            split["train"],
            base_info["pipeline_dir"],
            work / "controlnet",
            fraction * args.controlnet_seconds,
            done=cn_info,
        )
        log(f"SR ControlNet: {cn_info}")
        evaluations = [
            evaluate(store_uri, split["holdout"], cn_info["pipeline_dir"], args.steps, s) for s in strengths
        ]
        if fraction == BUDGET_FRACTIONS[-1]:  # which part holds SR back: the same model, no back-projection
            folder = cn_info["pipeline_dir"]
            evaluations.append(
                evaluate(store_uri, split["holdout"], folder, args.steps, args.strength, projection=False)
            )
        results["budgets"].append({"controlnet": cn_info, "evaluations": evaluations})
        log(f"evaluated budget {cn_info['seconds']} s")
        (work / "results.json").write_text(json.dumps(results, indent=1))
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    print(f"\nresults: {work / 'results.json'}  (total {results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
