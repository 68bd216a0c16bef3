"""Benchmark: metadata dropout as a learned "missing" embedding vs the reference's raw zeros (issue #7).

    python bench/metadata_dropout.py                                   # ~5 min on 2 shared CPU cores
    python bench/metadata_dropout.py --steps 800 --metadata-dropout 0.3 --out /tmp/dsat-md

1. Data: the three real Landsat scenes shipped in `catalogs/samples` (catalog `local-samples`): Bahamas
   (Landsat 7, 300 m, sea and reefs, no acquisition date), Rondonia (Landsat 8, 30 m, 2019-07, forest and
   clearings) and Madre de Dios (Landsat 8, 30 m, 2018-09, forest and river), ingested as `--tile-size` px
   rgb tiles (`ingest_items`, one worker). Image content goes with place, GSD and date. No scene reports
   cloud cover and the Bahamas has no date: those fields are missing in the data. The store's deterministic
   holdout split (`holdout_fraction` 0.1) is kept for evaluation; everything trains on the rest.
2. A small VAE trained on the train tiles (`train_vae`, `--vae-steps`), shared by both models, so samples
   decode to images rather than a random decoder's output.
3. Models: two tiny DiffusionSat models trained with `train_diffusionsat.train` from the same seed, on the
   same batches with the same dropout draws and step budget; only `metadata_dropout_mode` differs: "learned"
   (dropped or missing fields use the learned missing embedding) vs "zero" (the reference: fed as a present
   0; the trainer saves this as the UNet's `missing_metadata`, so sampling does the same). Captions are
   dropped (`--caption-dropout`, default 1: they name the country, which would stand in for the metadata)
   and samples use the empty caption then, so metadata is the only conditioning. EMA is off.
4. Report per model, all with the same sampler seed (DDIM, `--inference-steps`, guidance 1.0):
   - sensitivity: mean |Δpixel| vs the base sample when lon, lat, gsd or month takes the values of the other
     scenes' held-out tiles, one field at a time (cloud_cover, absent from the data, takes the report's
     default values); bases: the real metadata of one held-out tile per scene; mean over the bases;
   - wrong metadata: `--n` held-out tiles taken in turn from each scene, their metadata deranged
     (`shuffled_metadata`): mean |Δpixel| and the increase of the error against the real tiles (> 0:
     correct metadata helps);
   - all missing (`all_missing_change`): mean |Δpixel| when every field of those tiles is marked missing.
5. A side-by-side table with learned/zero ratios (`score_ratios`); everything also in `<out>/results.json`.

Pixels are in [0, 1]. With a few hundred CPU steps the models are far from converged: the numbers compare
how the two modes shape the metadata pathway, not final quality.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.logging import disable_progress_bar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dsat_core.data.catalog import CATALOG_DIR, load_catalog  # noqa: E402
from dsat_core.data.dataset import TileDataset  # noqa: E402
from dsat_core.data.ingest import ingest_items  # noqa: E402
from dsat_core.data.stac_server import static_catalog_items  # noqa: E402
from dsat_core.evaluation.report import default_sensitivity_values, make_sample_fn  # noqa: E402
from dsat_core.evaluation.sensitivity import (  # noqa: E402
    all_missing_change,
    robustness,
    score_ratios,
    sensitivity,
    shuffled_metadata,
)
from dsat_core.imaging import to_rgb  # noqa: E402
from dsat_core.metadata import SatMetadata  # noqa: E402
from dsat_core.pipelines import DiffusionSatPipeline  # noqa: E402
from dsat_core.training.config import METADATA_DROPOUT_MODES, TrainConfig  # noqa: E402
from dsat_core.training.train_diffusionsat import train  # noqa: E402
from dsat_core.training.train_vae import VAETrainConfig, train_vae  # noqa: E402

SAMPLES_CATALOG = CATALOG_DIR / "samples" / "catalog" / "catalog.json"
SENSITIVITY_FIELDS = ("lon", "lat", "gsd", "cloud_cover", "month")
SPLITS = ("train", "holdout")


@dataclass
class EvalInputs:
    """Held-out tiles: one sensitivity base per scene, and `--n` tiles (scenes in turn) with real images."""

    bases: list[SatMetadata]
    base_captions: list[str]
    metadata: list[SatMetadata]
    captions: list[str]
    reference: np.ndarray  # float [0, 1] (n, 3, H, W)


def build_store(out: Path, tile_size: int) -> tuple[str, dict[str, Any]]:
    """Ingest the sample scenes as `tile_size` px tiles into `<out>/store.zarr`; its URI and tile counts."""
    store = str(out / "store.zarr")
    config = load_catalog("local-samples").model_copy(update={"tile_size": tile_size})
    report = ingest_items(static_catalog_items(SAMPLES_CATALOG, config.name), config, store, n_workers=1)
    counts = {split: dict(Counter(scene_of(TileDataset(store, "rgb", split=split)))) for split in SPLITS}
    return store, {"rgb_tiles": report.total_tiles.get("rgb", 0), "seconds": report.seconds, **counts}


def scene_of(tiles: TileDataset) -> list[str]:
    """The item (scene) id of each tile."""
    return [str(tiles[i]["item_id"]) for i in range(len(tiles))]


def train_model(args: argparse.Namespace, store: str, vae: str, mode: str) -> tuple[str, dict[str, float]]:
    """Train one tiny model with `metadata_dropout_mode=mode`; returns its pipeline folder and run stats."""
    config = TrainConfig(
        store_uri=store,
        output_dir=str(args.out / f"model-{mode}"),
        model_size="tiny",
        text_encoder="hash",
        vae=vae,
        resolution=args.tile_size,
        train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler="constant",
        max_steps=args.steps,
        checkpointing_steps=args.steps,
        caption_dropout=args.caption_dropout,
        metadata_dropout=args.metadata_dropout,
        metadata_dropout_mode=mode,
        use_ema=False,
        use_mlflow=False,
        log_every=max(1, args.steps // 4),
        seed=args.seed,
    )
    tic = time.perf_counter()
    result = train(config)
    if result.pipeline_dir is None:
        raise RuntimeError(f"training ({mode}) saved no pipeline")
    return result.pipeline_dir, {"train_s": time.perf_counter() - tic, "final_loss": result.final_loss}


def evaluation_inputs(store: str, n: int, empty_captions: bool) -> EvalInputs:
    """The held-out tiles of `EvalInputs`; captions "" when `empty_captions` (the models never saw any)."""
    tiles = TileDataset(store, "rgb", split="holdout")
    by_scene: dict[str, list[int]] = {}
    for i, item in enumerate(scene_of(tiles)):
        by_scene.setdefault(item, []).append(i)
    if len(by_scene) < 2:
        raise ValueError(f"{store}: held-out tiles of {len(by_scene)} scene(s); the comparison needs >= 2")
    queues = [list(rows) for rows in by_scene.values()]
    picks: list[int] = []
    while len(picks) < n and any(queues):
        picks += [q.pop(0) for q in queues if q][: n - len(picks)]

    def caption(sample: dict[str, Any]) -> str:
        return "" if empty_captions else str(sample["caption"])

    def meta(sample: dict[str, Any]) -> SatMetadata:
        return SatMetadata.decode(sample["metadata"].numpy(), sample["metadata_mask"].numpy())

    bases = [tiles[rows[0]] for rows in by_scene.values()]
    samples = [tiles[i] for i in picks]
    rgb = to_rgb(torch.stack([s["pixel_values"] for s in samples]), tiles.bands)
    return EvalInputs(
        bases=[meta(s) for s in bases],
        base_captions=[caption(s) for s in bases],
        metadata=[meta(s) for s in samples],
        captions=[caption(s) for s in samples],
        reference=((rgb + 1) / 2).clamp(0, 1).numpy(),
    )


def sensitivity_values(base: SatMetadata, bases: list[SatMetadata]) -> dict[str, list[Any]]:
    """Per field, the other bases' values of it (real values of other scenes); the report's default
    values for a field no other base has."""
    defaults = default_sensitivity_values(base)
    values: dict[str, list[Any]] = {}
    for field in SENSITIVITY_FIELDS:
        own = getattr(base, field)
        others = sorted({v for b in bases if (v := getattr(b, field)) is not None and v != own})
        values[field] = others or defaults[field]
    return values


def model_report(pipeline_dir: str, args: argparse.Namespace, inputs: EvalInputs) -> dict[str, Any]:
    """Sensitivity per field (mean over the bases), wrong (shuffled) metadata and all-missing change."""
    pipe = DiffusionSatPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=args.inference_steps, guidance_scale=1.0)
    tic = time.perf_counter()
    per_base = []
    for base, caption in zip(inputs.bases, inputs.base_captions, strict=True):
        values = sensitivity_values(base, inputs.bases)
        changes = sensitivity(make_sample_fn(pipe, caption, **common), base, values, args.seed)
        per_base.append({"base": base.to_dict(), "values": values, "change": changes})
    robust_fn = make_sample_fn(pipe, inputs.captions, **common)
    wrong = shuffled_metadata(inputs.metadata, args.seed)
    return {
        "fields": {f: float(np.mean([b["change"][f] for b in per_base])) for f in SENSITIVITY_FIELDS},
        "per_base": per_base,
        "robustness": robustness(robust_fn, inputs.metadata, wrong, args.seed, reference=inputs.reference),
        "all_missing_change": all_missing_change(robust_fn, inputs.metadata, args.seed),
        "eval_s": time.perf_counter() - tic,
    }


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The table's rows of one model's report."""
    rows = {f"sensitivity {f}": report["fields"][f] for f in SENSITIVITY_FIELDS}
    rows["wrong metadata: change"] = report["robustness"]["mean_abs_change"]
    rows["wrong metadata: error increase"] = report["robustness"]["error_increase"]
    rows["all missing: change"] = report["all_missing_change"]
    return rows


def format_table(learned: dict[str, float], zero: dict[str, float]) -> str:
    ratios = score_ratios(learned, zero)
    lines = [f"{'mean |Δpixel| (images in [0, 1])':34s} {'learned':>10s} {'zero':>10s} {'learned/zero':>13s}"]
    for key, value in learned.items():
        ratio = ratios[key]
        text = f"{ratio:13.2f}" if math.isfinite(ratio) else f"{ratio!s:>13s}"
        lines.append(f"{key:34s} {value:10.3e} {zero[key]:10.3e} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps per model")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--metadata-dropout", type=float, default=0.1, help="per-field dropout probability")
    p.add_argument("--caption-dropout", type=float, default=1.0, help="1: train and sample without captions")
    p.add_argument("--tile-size", type=int, default=32, help="tile size and training resolution (px)")
    p.add_argument("--vae-steps", type=int, default=200, help="steps of the shared small VAE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--inference-steps", type=int, default=10, help="DDIM steps per sample")
    p.add_argument("--n", type=int, default=9, help="held-out tiles for the wrong / missing comparisons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on shared boxes)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.n < 2:
        p.error("--steps must be >= 1 and --n >= 2")
    torch.set_num_threads(args.threads)
    disable_progress_bar()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="dsat-metadata-dropout-"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"config: { {k: str(v) for k, v in vars(args).items()} }")

    store, tiles = build_store(args.out, args.tile_size)
    print(f"store: {tiles}")
    tic = time.perf_counter()
    vae = train_vae(
        VAETrainConfig(
            store, str(args.out / "vae"), resolution=args.tile_size, max_steps=args.vae_steps, seed=args.seed
        )
    )
    vae_s = time.perf_counter() - tic
    inputs = evaluation_inputs(store, args.n, empty_captions=args.caption_dropout >= 1.0)
    runs: dict[str, dict[str, Any]] = {}
    for mode in METADATA_DROPOUT_MODES:
        pipeline_dir, stats = train_model(args, store, vae.vae_dir, mode)
        runs[mode] = {**stats, "report": model_report(pipeline_dir, args, inputs)}
    rows = {mode: summary(run["report"]) for mode, run in runs.items()}

    print(
        f"\nmetadata dropout mode: tiny SatUNet on the {len(inputs.bases)} sample scenes "
        f"({sum(tiles['train'].values())} train / {sum(tiles['holdout'].values())} held-out tiles), "
        f"{args.steps} steps x batch {args.batch_size}, p={args.metadata_dropout}, {args.tile_size}px, "
        f"DDIM {args.inference_steps}, seed {args.seed}"
    )
    print(f"  VAE      train {vae_s:6.1f} s, final loss {vae.final_loss:.4f}")
    for mode, run in runs.items():
        print(
            f"  {mode:8s} train {run['train_s']:6.1f} s, final loss {run['final_loss']:.4f}, "
            f"report {run['report']['eval_s']:5.1f} s"
        )
    print(format_table(rows["learned"], rows["zero"]))
    results = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "store": tiles,
        "vae": {"train_s": vae_s, "final_loss": vae.final_loss, "vae_dir": vae.vae_dir},
        "runs": runs,
        "table": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
