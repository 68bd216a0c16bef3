"""Benchmark: a tiny super-resolution ControlNet3D against bicubic upsampling on held-out REAL tiles.

    python bench/controlnet_sr.py --workdir /tmp/dsat-bench-sr            # ~10 min on 2 CPU cores
    python bench/controlnet_sr.py --workdir /tmp/x --vae-seconds 5 --base-seconds 5 --controlnet-seconds 10

What it does, all on CPU within a documented wall-clock budget:

1. Data: the real reader (`dsat_core.data.reader.read_item`) tiles three real scenes from
   ../shared/data/real into a store with two products read from the same scenes — ``rgb`` (red, green, blue)
   and ``multispectral`` (blue, green, red, nir), 64 px tiles, native grid, percentile scaling:
   Sentinel-2 L2A T29RKH (Mauritania, 100 m, 289 tiles) and the Landsat 8 scenes Rondonia and Madre de Dios
   (30 m, 13 tiles).
2. Splits: TRAIN = T29RKH tiles north of a latitude line; TEST-S2 = T29RKH tiles south of it (one tile
   row left out between them); TEST-LANDSAT = both Landsat scenes (another sensor, place and GSD; never
   trained on).
3. Models (there are no pretrained weights offline): a tiny `AutoencoderKL` (4 latents, ×2 downsampling)
   trained as an autoencoder for ``--vae-seconds``; a tiny `SatUNet` trained with `train_diffusionsat` for
   ``--base-seconds``; then the SR `ControlNet3D` trained with `train_controlnet` (base frozen) for
   ``--controlnet-seconds``. Both trainers are run in chunks of steps with ``resume_from_checkpoint="latest"``
   until their budget is spent (a constant learning rate, so chunking does not change the schedule).
4. Task: tiles resized 64 → 32 px (what the models see; 4× cheaper steps than 64 px), then degraded
   multispectral input (DegradationRecipe factor 4, Gaussian σ = 1 px, bands blue, green, red, nir; 32 → 8 px,
   upsampled back bicubically) → 32 px RGB.
5. Evaluation (same tiles, same run): PSNR / SSIM (`dsat_core.evaluation.paired_metrics`, range [-1, 1]) of
   - bicubic: `bicubic_upsample` of the red, green, blue bands of the same 8 px degraded input;
   - controlnet: `SatControlNetPipeline`, DDIM ``--steps`` steps, guidance 1.0, fixed seed;
   - base (controlnet scale 0): the frozen base model alone (shows whether the ControlNet uses its input);
   - vae ceiling: decode(encode(target)), the best any model in this latent space could do.
   Prints per split where the ControlNet wins over bicubic and where it does not; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec, ScalingSpec  # noqa: E402
from dsat_core.data.store import DatasetStore  # noqa: E402
from dsat_core.data.tasks import DegradationRecipe, SuperResolutionDataset, collate_task_batch  # noqa: E402
from dsat_core.evaluation import paired_metrics  # noqa: E402
from dsat_core.imaging import bicubic_upsample  # noqa: E402
from dsat_core.metadata import SatMetadata  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
S2_ITEM = "sentinel2-l2a-T29RKH-20200219"
LANDSAT_ITEMS = ["landsat8-oli-sr-rondonia-20190727", "landsat8-oli-sr-madre-de-dios-20180906"]
BANDS = ("blue", "green", "red", "nir")
RECIPE = DegradationRecipe(factor=4, blur_sigma=1.0, bands=BANDS)
TILE = 64  # tiles in the store
RESOLUTION = 32  # what the models see: tiles resized 64 → 32 px (4× fewer latents, much cheaper steps)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def catalog() -> CatalogConfig:
    scaling = {"mode": "percentile", "percentiles": (2.0, 98.0)}
    return CatalogConfig(
        name="bench-sr",
        description="real S2 / Landsat scenes read as rgb + multispectral for the SR benchmark",
        stac_api="http://127.0.0.1:1",
        collections=["real"],
        target_crs="native",
        target_gsd=None,
        tile_size=TILE,
        allowed_schemes=["file"],
        allowed_roots=[str(REAL)],
        products={
            "rgb": ProductSpec(
                bands=[BandSpec(name=b) for b in ("red", "green", "blue")],
                scaling=ScalingSpec(dtype="uint8", **scaling),
                required=True,
            ),
            "multispectral": ProductSpec(
                bands=[BandSpec(name=b) for b in BANDS], scaling=ScalingSpec(dtype="uint16", **scaling)
            ),
        },
    )


def build_store(path: Path) -> str:
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import load_static_catalog

    if (path / "zarr.json").is_file():
        return str(path)
    items = {i["id"]: i for i in load_static_catalog(REAL / "catalog" / "catalog.json")}
    config = catalog()
    store = DatasetStore.open(str(path), create=True, catalog=config)
    staged = []
    for item_id in (S2_ITEM, *LANDSAT_ITEMS):
        scene = read_item(items[item_id], config)
        log(
            f"read {item_id}: { {k: len(v) for k, v in scene.products.items()} } tiles, "
            f"{len(scene.rejected)} rejected"
        )
        staged.append(store.stage(scene))
    store.commit(staged)
    return str(path)


def splits(store_uri: str) -> dict[str, dict]:
    """Dataset filters of TRAIN / TEST-S2 / TEST-LANDSAT (see the module docstring).

    T29RKH is split by tile row: the southern quarter of the rows is TEST-S2, the row above it is left out,
    the rest is TRAIN. The rows are turned into latitude bounds (tile centres) for the datasets' bbox filter.
    """
    store = DatasetStore.open(store_uri, read_only=True)
    group = store.product_group("rgb")
    n = store.n_tiles("rgb")
    items = np.array([str(i) for i in group["item_id"][:n].tolist()])
    row_off = np.asarray(group["window"][:n])[:, 0]
    lat = np.asarray(group["lat"][:n])
    s2 = items == S2_ITEM
    rows = np.unique(row_off[s2])
    test_rows = rows[-max(1, len(rows) // 4) :]
    train_rows = rows[: -(len(test_rows) + 1)]
    test_max = float(lat[s2 & np.isin(row_off, test_rows)].max())
    train_min = float(lat[s2 & np.isin(row_off, train_rows)].min())
    if not test_max < train_min:
        raise RuntimeError(
            f"T29RKH rows do not separate by latitude: test up to {test_max}, train from {train_min}"
        )
    return {
        "train": {"item_ids": [S2_ITEM], "bbox": (-180.0, train_min - 1e-9, 180.0, 90.0)},
        "test_s2": {"item_ids": [S2_ITEM], "bbox": (-180.0, -90.0, 180.0, test_max + 1e-9)},
        "test_landsat": {"item_ids": LANDSAT_ITEMS},
    }


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


def run_chunked(train_fn, make_config, seconds: float, chunk: int) -> dict:
    """Call a trainer in chunks of `chunk` steps (resuming) until `seconds` of wall time are spent."""
    start, step, result = time.perf_counter(), 0, None
    while step == 0 or time.perf_counter() - start < seconds:
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
        bbox=split["bbox"],
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


def train_sr_controlnet(store_uri: str, split: dict, base_dir: str, out: Path, seconds: float) -> dict:
    from dsat_core.training.train_controlnet import TrainControlNetConfig, train

    def make(max_steps: int) -> TrainControlNetConfig:
        return TrainControlNetConfig(
            task="sr",
            base_model=base_dir,
            item_ids=split["item_ids"],
            cond_product="multispectral",
            degradation=RECIPE.to_dict(),
            conditioning_embedding_channels=(16, 32, 96, 256),
            **common_training(store_uri, split, out, max_steps),
        )

    return run_chunked(train, make, seconds, chunk=40)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(store_uri: str, split: dict, pipeline_dir: str, steps: int) -> dict:
    from dsat_core.models import decode_latents, encode_latents
    from dsat_core.pipelines import SatControlNetPipeline

    pipe = SatControlNetPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    ds = SuperResolutionDataset(store_uri, recipe=RECIPE, resolution=RESOLUTION, **split)
    rgb_idx = [list(RECIPE.bands).index(b) for b in ("red", "green", "blue")]
    preds: dict[str, list[torch.Tensor]] = {
        "bicubic": [],
        "controlnet": [],
        "base_scale0": [],
        "vae_ceiling": [],
    }
    targets, names = [], []
    for start in range(0, len(ds), 16):
        samples = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        batch = collate_task_batch(samples)
        target = batch["pixel_values"]
        targets.append(target)
        names += [f"{s['item_id']}#{s['index']}" for s in samples]
        # bicubic from the same 8 px degraded input (its red, green, blue bands)
        lows = []
        for pos in range(start, start + len(samples)):
            _, cond_pos = ds.pairs[pos]
            lows.append(RECIPE.lowres(ds.cond_tiles[cond_pos]["pixel_values"], ds.cond_tiles.bands)[rgb_idx])
        preds["bicubic"].append(bicubic_upsample(torch.stack(lows), RESOLUTION).clamp(-1, 1))
        meta = [
            SatMetadata.decode(v.double().numpy(), m.numpy())
            for v, m in zip(batch["metadata"], batch["metadata_mask"], strict=True)
        ]
        for name, scale in (("controlnet", 1.0), ("base_scale0", 0.0)):
            out = pipe(
                batch["cond"],
                batch["cond_metadata"],
                meta,
                list(batch["caption"]),
                cond_metadata_mask=batch["cond_metadata_mask"],
                num_inference_steps=steps,
                guidance_scale=1.0,
                controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
            preds[name].append(out * 2 - 1)
        preds["vae_ceiling"].append(decode_latents(pipe.vae, encode_latents(pipe.vae, target)).clamp(-1, 1))
    target = torch.cat(targets)
    result: dict = {"n_tiles": len(target), "tiles": names, "methods": {}}
    for name, chunks in preds.items():
        metrics = paired_metrics(torch.cat(chunks), target, data_range=(-1.0, 1.0))
        result["methods"][name] = {
            "psnr": metrics.mean["psnr"],
            "ssim": metrics.mean["ssim"],
            "per_tile_psnr": metrics.per_image["psnr"].round(3).tolist(),
            "per_tile_ssim": metrics.per_image["ssim"].round(4).tolist(),
        }
    return result


def report(results: dict) -> None:
    print("\n=== SR ControlNet vs bicubic (PSNR dB / SSIM, higher is better; range [-1, 1]) ===")
    for split, res in results["splits"].items():
        print(f"\n{split}: {res['n_tiles']} tiles")
        for name, m in res["methods"].items():
            print(f"  {name:<12} PSNR {m['psnr']:6.2f}  SSIM {m['ssim']:.4f}")
        cn, bc = res["methods"]["controlnet"], res["methods"]["bicubic"]
        wins_p = [
            t for t, a, b in zip(res["tiles"], cn["per_tile_psnr"], bc["per_tile_psnr"], strict=True) if a > b
        ]
        wins_s = [
            t for t, a, b in zip(res["tiles"], cn["per_tile_ssim"], bc["per_tile_ssim"], strict=True) if a > b
        ]
        print(
            f"  controlnet beats bicubic on PSNR in {len(wins_p)}/{res['n_tiles']} tiles, "
            f"on SSIM in {len(wins_s)}/{res['n_tiles']}"
        )
        if wins_p:
            print(f"  PSNR wins: {', '.join(wins_p[:10])}{' ...' if len(wins_p) > 10 else ''}")
        verdict = "WINS" if cn["psnr"] > bc["psnr"] else "LOSES"
        ssim_verdict = "wins" if cn["ssim"] > bc["ssim"] else "loses"
        print(
            f"  → on average the ControlNet {verdict} against bicubic on PSNR "
            f"({cn['psnr'] - bc['psnr']:+.2f} dB) and {ssim_verdict} on SSIM ({cn['ssim'] - bc['ssim']:+.4f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsat-bench-controlnet-sr"))
    parser.add_argument("--vae-seconds", type=float, default=90.0)
    parser.add_argument("--base-seconds", type=float, default=120.0)
    parser.add_argument("--controlnet-seconds", type=float, default=300.0)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps at evaluation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (REAL / "catalog" / "catalog.json").is_file():
        print(f"real data not found at {REAL}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store_uri = build_store(work / "store.zarr")
    split = splits(store_uri)
    sizes = {k: len(SuperResolutionDataset(store_uri, recipe=RECIPE, **v)) for k, v in split.items()}
    log(f"store ready; SR pairs per split: {sizes}")
    vae_info = train_vae(store_uri, split["train"], work / "vae", args.vae_seconds)
    log(f"VAE: {vae_info}")
    base_info = train_base(store_uri, split["train"], work / "vae", work / "base", args.base_seconds)
    log(f"base SatUNet: {base_info}")
    cn_info = train_sr_controlnet(
        store_uri, split["train"], base_info["pipeline_dir"], work / "controlnet", args.controlnet_seconds
    )
    log(f"SR ControlNet: {cn_info}")
    results = {
        "recipe": RECIPE.to_dict(),
        "budget_seconds": {
            "vae": args.vae_seconds,
            "base": args.base_seconds,
            "controlnet": args.controlnet_seconds,
        },
        "threads": args.threads,
        "training": {"vae": vae_info, "base": base_info, "controlnet": cn_info},
        "split_sizes": sizes,
        "eval_ddim_steps": args.steps,
        "splits": {},
    }
    for name in ("test_s2", "test_landsat"):
        results["splits"][name] = evaluate(store_uri, split[name], cn_info["pipeline_dir"], args.steps)
        log(f"evaluated {name}")
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    print(f"\nresults: {work / 'results.json'}  (total {results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
