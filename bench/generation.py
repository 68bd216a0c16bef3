"""Benchmark: generation metrics at an honest sample size — ≥ 256 samples against ≥ 256 held-out REAL tiles,
through `dsat_core.evaluation.evaluate_generation` (the path `dsat evaluate` / the evaluate flow run).

    python bench/generation.py --workdir /tmp/dsat-bench-gen                 # ~10 min on 2 quiet CPU cores
    python bench/generation.py --workdir /tmp/x --base-seconds 60 --steps 5  # a quicker look

1. Data: the real reader tiles every RGB scene of ../shared/data/real (Sentinel-2 L2A T29RKH, Landsat 8
   Rondonia and Madre de Dios, Landsat 7 Bahamas) and the two of catalogs/samples/extra that are not in it
   (Landsat 7 Everest, Landsat 8 016037) into an ``rgb`` store of 32 px tiles (32 px: the size the tiny model
   generates, and 4× more tiles than 64 px, so that ≥ 256 of them can be held out). The other shipped
   scenes are the same pixels as ../shared/data/real's and are left out (no duplicate tiles across the split).
2. Split: the project's split by tile identity, ``--holdout-fraction`` 0.15 (~315 of ~2100 tiles held out):
   the model trains on ``split="train"``, the real set is ``split="holdout"``.
3. Model: the shipped offline VAE (`dsat_core/models/default_vae`) and a tiny `SatUNet` trained with
   `train_diffusionsat` for ``--base-seconds`` (hash text encoder; there are no pretrained weights offline).
4. Metrics: `evaluate_generation`, ``--n-samples`` (256) samples for held-out captions + metadata against as
   many held-out real tiles, DDIM ``--steps``: FID with its bootstrap interval, KID with its std; every figure
   printed with its sample size. Writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from real_scenes import REAL, build_store, log, real_catalog  # noqa: E402

from dsat_core.data.catalog import CatalogConfig  # noqa: E402
from dsat_core.models.vae import DEFAULT_VAE_DIR  # noqa: E402

REAL_ITEMS = [
    "sentinel2-l2a-T29RKH-20200219",
    "landsat8-oli-sr-rondonia-20190727",
    "landsat8-oli-sr-madre-de-dios-20180906",
    "landsat7-etm-bahamas-rgb",
]
EXTRA_ITEMS = ["landsat7-etm-everest-20001030-rgb", "landsat8-oli-l1tp-016037-20170813"]
TILE = 32


def catalog() -> CatalogConfig:
    description = "real RGB scenes for the generation benchmark (32 px tiles)"
    return real_catalog("bench-generation", description, TILE)


def train_base(store_uri: str, out: Path, seconds: float, holdout_fraction: float) -> dict:
    """A tiny SatUNet on the train split, in chunks of steps (resuming) until ``seconds`` are spent."""
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.train_diffusionsat import train

    start, step, result = time.perf_counter(), 0, None
    while result is None or time.perf_counter() - start < seconds:
        result = train(
            TrainConfig(
                store_uri=store_uri,
                output_dir=str(out),
                vae=str(DEFAULT_VAE_DIR),
                split="train",
                holdout_fraction=holdout_fraction,
                resolution=TILE,
                model_size="tiny",
                text_encoder="hash",
                train_batch_size=16,
                learning_rate=5e-4,
                lr_scheduler="constant",
                max_steps=step + 50,
                checkpointing_steps=10_000,
                checkpoints_total_limit=1,
                resume_from_checkpoint="latest",
                use_mlflow=False,
                save_pipeline=True,
                ema_decay=0.99,
                seed=0,
                log_every=50,
            )
        )
        step = result.global_step
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": result.final_loss,
        "pipeline_dir": result.pipeline_dir,
    }


def report(metrics: dict) -> None:
    from dsat_core.evaluation.metrics import metric_sample_size

    print("\n=== generation vs held-out real tiles (evaluate_generation; lower is better) ===")
    fid = f"FID {metrics['fid']:.1f}"
    if "fid_ci_low" in metrics:
        fid += f"  [{metrics['fid_ci_low']:.1f}, {metrics['fid_ci_high']:.1f}] bootstrap interval"
    print(f"  {fid}  ({metric_sample_size('fid', metrics)})")
    kid = f"KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f} (std over subsets)"
    print(f"  {kid}  ({metric_sample_size('kid_mean', metrics)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsat-bench-generation"))
    parser.add_argument("--base-seconds", type=float, default=240.0)
    parser.add_argument("--n-samples", type=int, default=256, help="generated samples = real tiles")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--holdout-fraction", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (REAL / "catalog" / "catalog.json").is_file():
        print(f"real data not found at {REAL}", file=sys.stderr)
        return 2
    from dsat_core.data.dataset import TileDataset
    from dsat_core.evaluation.runner import evaluate_generation

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store_uri = build_store(
        args.workdir / "store.zarr", catalog(), REAL_ITEMS + EXTRA_ITEMS, skip_missing=True
    )
    held_out = len(TileDataset(store_uri, "rgb", split="holdout", holdout_fraction=args.holdout_fraction))
    log(f"store ready: {held_out} held-out rgb tiles")
    if held_out < args.n_samples:
        log(f"only {held_out} held-out tiles for {args.n_samples} samples: the real set is smaller")
    base = train_base(store_uri, args.workdir / "base", args.base_seconds, args.holdout_fraction)
    log(f"base SatUNet: {base}")
    start = time.perf_counter()
    result = evaluate_generation(
        base["pipeline_dir"],
        store_uri,
        n_samples=args.n_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        holdout_fraction=args.holdout_fraction,
        batch_size=32,
    )
    results = {
        "training": base,
        "held_out_tiles": held_out,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "metrics": result.metrics,
        "params": {k: v for k, v in result.params.items() if isinstance(v, str | int | float | bool)},
        "sample_sizes": result.params.get("sample_sizes"),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    report(result.metrics)
    print(f"\nresults: {args.workdir / 'results.json'}  (total {results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
