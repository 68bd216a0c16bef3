"""Evaluation runs: a trained pipeline against the held-out tiles of a dataset store.

- `evaluate_generation`: sample N images (DiffusionSatPipeline) from the captions and metadata of held-out
  tiles (cycling when there are fewer tiles than samples), FID / KID against the real held-out tiles,
  Inception Score and CLIP score when their local models are given (else recorded in `skipped` with why).
- `evaluate_controlnet`: SSIM / PSNR (and LPIPS with local weights) of a SatControlNetPipeline on a task
  (`sr`, `temporal`, `inpaint`) AND of the task's classical baseline (bicubic, nearest-date frame, harmonic
  inpainting) on the SAME held-out tiles, with one row per tile.

Both return plain results (uint8 images, per-sample rows, metric dicts) that `report.py` turns into grids,
quality maps and STAC catalogs. Nothing here logs anywhere: the `evaluate` flow does that.

Sample i always uses the generator seed ``seed + i`` (recorded per row and in STAC), so any single image
can be regenerated on its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dsat_core.data.dataset import TileDataset
from dsat_core.evaluation.image_ops import bicubic_upsample, classical_inpaint, nearest_date_index, to_rgb
from dsat_core.evaluation.metrics import ImageMetrics, paired_metrics
from dsat_core.metadata import FIELD_NAMES, SatMetadata

Split = Literal["train", "holdout"] | None
ControlTask = Literal["sr", "temporal", "inpaint"]
BASELINES: dict[str, str] = {"sr": "bicubic", "temporal": "nearest_date", "inpaint": "classical_inpaint"}
GENERATION_METRICS = ("fid", "kid", "is", "clip")


# ----------------------------------------------------------------------------------------------- results
@dataclass
class GenerationEval:
    """Result of `evaluate_generation`.

    ``images`` / ``real_images``: uint8 (N, 3, H, W). ``references``: uint8, the real tile whose caption and
    metadata each sample was generated from (aligned with ``images``). ``records``: one dict per sample (tile
    row, item id, the 7 metadata fields, caption, seed, ``nearest_real_distance``). ``skipped``: metric →
    reason.
    """

    metrics: dict[str, float]
    skipped: dict[str, str]
    records: list[dict[str, Any]]
    images: np.ndarray
    real_images: np.ndarray
    metadata: list[SatMetadata]
    prompts: list[str]
    seeds: list[int]
    params: dict[str, Any]
    n_eval_tiles: int
    references: np.ndarray | None = field(default=None, repr=False)
    kind: str = "generation"
    map_metric: str = "nearest_real_distance"
    map_label: str = "distance to nearest real held-out tile"

    def table(self) -> dict[str, list[Any]]:
        """Columns of `records` (for `mlflow.log_table` / pandas)."""
        return _columns(self.records)


@dataclass
class PairedEval:
    """Result of `evaluate_controlnet`: the model and the task baseline on the same tiles.

    ``metrics`` holds ``<metric>/model`` and ``<metric>/<baseline>`` side by side (e.g. ``psnr/model``,
    ``psnr/bicubic``); ``records`` one row per tile with ``<metric>_model`` / ``<metric>_baseline``.
    ``images`` (model), ``baselines`` and ``targets`` are uint8 (N, 3, H, W), aligned with ``records``.
    ``inputs``: the conditioning keyword inputs of the first (up to 8) samples, for sensitivity runs.
    """

    kind: str
    baseline: str
    metrics: dict[str, float]
    skipped: dict[str, str]
    records: list[dict[str, Any]]
    images: np.ndarray
    baselines: np.ndarray
    targets: np.ndarray
    metadata: list[SatMetadata]
    prompts: list[str]
    seeds: list[int]
    params: dict[str, Any]
    n_eval_tiles: int
    map_metric: str = "psnr_model"
    map_label: str = "PSNR of the model (dB)"
    cond_preview: np.ndarray | None = field(default=None, repr=False)
    inputs: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def table(self) -> dict[str, list[Any]]:
        return _columns(self.records)


def _columns(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


# ----------------------------------------------------------------------------------------------- helpers
def load_pipeline(pipeline: Any, cls: type, device: str | torch.device = "cpu") -> Any:
    """`cls.from_pretrained(pipeline)` for a folder, or the given pipeline object; progress bars off."""
    if isinstance(pipeline, (str, Path)):
        path = Path(pipeline)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: not a saved pipeline folder (model_index.json missing)")
        pipeline = cls.from_pretrained(str(path))
    if not isinstance(pipeline, cls):
        raise TypeError(f"expected a {cls.__name__} (or its folder), got {type(pipeline).__name__}")
    pipeline = pipeline.to(torch.device(device))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@lru_cache(maxsize=1)
def shared_inception() -> nn.Module:
    """The offline FID Inception, loaded once per process (loading the TorchScript graph takes seconds)."""
    from dsat_core.evaluation.inception import InceptionFeatures

    return InceptionFeatures(batch_size=16)


def _to_uint8(unit: np.ndarray | torch.Tensor) -> np.ndarray:
    """[0, 1] float → uint8, same shape."""
    arr = unit.detach().cpu().numpy() if isinstance(unit, torch.Tensor) else np.asarray(unit)
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _signed_to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _generators(seeds: Sequence[int], device: str | torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=torch.device(device)).manual_seed(int(s)) for s in seeds]


def _metadata_record(meta: SatMetadata) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = getattr(meta, name)
        out[name] = None if value is None else (round(float(value), 6) if isinstance(value, float) else value)
    return out


def _decode(vector: torch.Tensor, mask: torch.Tensor) -> SatMetadata:
    return SatMetadata.decode(vector.double().numpy(), mask.numpy())


def _empty_split_error(store_uri: str, product: str, split: Split, fraction: float, what: str) -> ValueError:
    return ValueError(
        f"{store_uri}/{product}: no {split or 'any'} tiles to evaluate on ({what}; holdout_fraction="
        f"{fraction}); ingest more scenes or raise holdout_fraction"
    )


def nearest_distance(queries: np.ndarray, points: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Euclidean distance from each row of ``queries`` (N, D) to its nearest row of ``points`` (M, D).

    Uses |a|^2 + |b|^2 - 2 a.b in chunks of queries, so memory is O(chunk * M), not O(N * M * D).
    """
    q = np.asarray(queries, np.float64)
    p = np.asarray(points, np.float64)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1] or len(p) == 0:
        raise ValueError(f"nearest_distance: queries {q.shape} and points {p.shape} must be (N, D), (M>0, D)")
    p_sq = (p**2).sum(1)
    out = np.empty(len(q))
    for start in range(0, len(q), chunk):
        block = q[start : start + chunk]
        d2 = (block**2).sum(1)[:, None] + p_sq[None, :] - 2.0 * block @ p.T
        out[start : start + chunk] = np.sqrt(np.clip(d2.min(axis=1), 0.0, None))
    return out


# -------------------------------------------------------------------------------------------- generation
def evaluate_generation(
    pipeline: Any,
    store_uri: str,
    *,
    product: str = "rgb",
    n_samples: int = 64,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 8,
    split: Split = "holdout",
    holdout_fraction: float = 0.1,
    metrics: Sequence[str] = ("fid", "kid"),
    max_real: int | None = None,
    logits_model: nn.Module | str | Path | None = None,
    clip_model: Any = None,
    inception: nn.Module | None = None,
    kid_subsets: int = 100,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> GenerationEval:
    """Generate ``n_samples`` images for held-out metadata + captions and compare them with the real tiles.

    ``pipeline``: a `DiffusionSatPipeline` or its `save_pretrained` folder. Real tiles are read at the
    pipeline's output size (their metadata then carries the effective GSD, as in training). ``max_real``: how
    many held-out tiles form the real set (default: as many as samples; evenly spread over the split).
    ``metrics``: any of fid, kid, is, clip; IS needs ``logits_model``, CLIP ``clip_model`` (local files): when
    missing they are recorded in ``skipped`` with the reason instead of failing the run.
    Per sample, ``nearest_real_distance`` is the L2 distance of its Inception features to the nearest real
    tile's (pixel-space RMS distance when neither fid nor kid is computed): a per-sample realism proxy
    that the quality map bins by location.
    """
    from dsat_core.evaluation.clip import CLIPUnavailable
    from dsat_core.evaluation.inception import InceptionScoreUnavailable
    from dsat_core.pipelines import DiffusionSatPipeline

    unknown = set(metrics) - set(GENERATION_METRICS)
    if unknown:
        raise ValueError(f"unknown generation metrics {sorted(unknown)}; choose from {GENERATION_METRICS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    pipe = load_pipeline(pipeline, DiffusionSatPipeline, device)
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    tiles = TileDataset(
        store_uri,
        product,
        resolution=size,
        split=split,
        holdout_fraction=holdout_fraction,
        storage_options=storage_options,
    )
    distribution = [m for m in ("fid", "kid") if m in metrics]
    if len(tiles) == 0 or (distribution and len(tiles) < 2):
        raise _empty_split_error(store_uri, product, split, holdout_fraction, f"{len(tiles)} found")
    if distribution and n_samples < 2:
        raise ValueError(f"{'/'.join(distribution)} need at least 2 samples, got n_samples={n_samples}")

    cache: dict[int, dict[str, Any]] = {}

    def tile(pos: int) -> dict[str, Any]:
        if pos not in cache:
            sample = tiles[pos]
            sample["rgb"] = to_rgb(sample["pixel_values"], tiles.bands)
            cache[pos] = sample
        return cache[pos]

    # conditioning: held-out tiles in order, cycling
    positions = [i % len(tiles) for i in range(n_samples)]
    metadata = [_decode(tile(p)["metadata"], tile(p)["metadata_mask"]) for p in positions]
    prompts = [tile(p)["caption"] for p in positions]
    seeds = [seed + i for i in range(n_samples)]
    images = []
    for start in range(0, n_samples, batch_size):
        stop = min(start + batch_size, n_samples)
        out = pipe(
            prompts[start:stop],
            metadata=metadata[start:stop],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=_generators(seeds[start:stop], device),
            output_type="np",
        ).images
        images.append(_to_uint8(np.asarray(out).transpose(0, 3, 1, 2)))
    fake = np.concatenate(images)

    n_real = min(len(tiles), max_real if max_real is not None else max(n_samples, 2))
    real_pos = np.unique(np.linspace(0, len(tiles) - 1, n_real).round().astype(int)).tolist()
    real = np.stack([_to_uint8(_signed_to_unit(tile(p)["rgb"])) for p in real_pos])

    results: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if distribution:
        net = inception if inception is not None else shared_inception()
        real_f = net(torch.from_numpy(real)).cpu().numpy().astype(np.float64)
        fake_f = net(torch.from_numpy(fake)).cpu().numpy().astype(np.float64)
        meter = ImageMetrics(
            distribution,
            inception=net,
            seed=seed,
            kid_subsets=kid_subsets,
            kid_subset_size=min(len(real_f), len(fake_f)),
        )
        meter.update_features(real=real_f, fake=fake_f)
        results.update({k: v for k, v in meter.compute().items() if not k.startswith("n_")})
        nearest = nearest_distance(fake_f, real_f)
        space = "inception"
    else:
        if fake.shape[1:] != real.shape[1:]:
            raise ValueError(f"generated {fake.shape[1:]} and real {real.shape[1:]} images differ in shape")
        flat_f = fake.reshape(len(fake), -1).astype(np.float64) / 255.0
        flat_r = real.reshape(len(real), -1).astype(np.float64) / 255.0
        nearest = nearest_distance(flat_f, flat_r) / np.sqrt(flat_f.shape[1])  # RMS over pixels
        space = "pixel"
    if "is" in metrics:
        try:
            meter = ImageMetrics(["is"], logits_model=logits_model, seed=seed, is_splits=min(10, n_samples))
        except InceptionScoreUnavailable as err:
            skipped["is"] = str(err)
        else:
            meter.update(fake=fake)
            results.update({k: v for k, v in meter.compute().items() if k.startswith("is_")})
    if "clip" in metrics:
        try:
            meter = ImageMetrics(["clip"], clip=clip_model, seed=seed)
        except CLIPUnavailable as err:
            skipped["clip"] = str(err)
        else:
            meter.update(fake=fake, prompts=prompts)
            results["clip_score"] = meter.compute()["clip_score"]
    results["n_real"] = float(len(real))
    results["n_fake"] = float(len(fake))

    records = []
    for i, pos in enumerate(positions):
        records.append(
            {
                "sample": i,
                "tile_index": int(tile(pos)["index"]),
                "item_id": tile(pos)["item_id"],
                **_metadata_record(metadata[i]),
                "caption": prompts[i],
                "seed": seeds[i],
                "nearest_real_distance": float(nearest[i]),
            }
        )
    params = {
        "kind": "generation",
        "product": product,
        "n_samples": n_samples,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "split": split,
        "holdout_fraction": holdout_fraction,
        "resolution": size,
        "metrics": ",".join(metrics),
        "nearest_real_space": space,
    }
    return GenerationEval(
        metrics=results,
        skipped=skipped,
        records=records,
        images=fake,
        real_images=real,
        metadata=metadata,
        prompts=prompts,
        seeds=seeds,
        params=params,
        n_eval_tiles=len(tiles),
        references=np.stack([_to_uint8(_signed_to_unit(tile(p)["rgb"])) for p in positions]),
        map_label=f"distance to nearest real held-out tile ({space} space)",
    )


# ---------------------------------------------------------------------------------------------- controlnet
def _task_dataset(
    task: str,
    store_uri: str,
    *,
    product: str,
    cond_product: str,
    degradation: Mapping[str, Any] | None,
    sequence_length: int,
    direction: str,
    mask_kind: str,
    seed: int,
    resolution: int | None,
    split: Split,
    holdout_fraction: float,
    storage_options: Mapping[str, Any] | None,
):
    from dsat_core.data import tasks

    common = dict(resolution=resolution, storage_options=storage_options)
    split_kw = dict(split=split, holdout_fraction=holdout_fraction)
    if task == "sr":
        return tasks.SuperResolutionDataset(
            store_uri, product, cond_product, dict(degradation or {}), **common, **split_kw
        )
    if task == "inpaint":
        return tasks.InpaintingDataset(store_uri, product, mask_kind, seed=seed, **common, **split_kw)
    if task == "temporal":
        # the TARGET must be held out; its conditioning frames may be any other acquisition of the place
        ds = tasks.TemporalDataset(store_uri, product, sequence_length, direction, **common)
        if split is not None:
            held = set(
                TileDataset(store_uri, product, storage_options=storage_options, **split_kw).indices.tolist()
            )
            ds.sequences = [
                (pos, frames) for pos, frames in ds.sequences if int(ds.tiles.indices[pos]) in held
            ]
            ds.recipe = {**ds.recipe, "split": split, "holdout_fraction": holdout_fraction}
        return ds
    raise ValueError(f"unknown ControlNet task {task!r}; choose one of {sorted(BASELINES)}")


def _target_tiles(ds: Any) -> TileDataset:
    return ds.target if ds.task == "sr" else ds.tiles


def _baseline(ds: Any, i: int, sample: dict[str, Any]) -> torch.Tensor:
    """The task baseline for sample ``i`` as float (3, H, W) in [0, 1]."""
    size = tuple(sample["pixel_values"].shape[-2:])
    if ds.task == "sr":
        _, cond_pos = ds.pairs[i]
        raw = ds.cond_tiles[cond_pos]["pixel_values"]
        low = ds.degradation.lowres(raw, ds.cond_tiles.bands)  # (C', h, w) in [-1, 1]
        up = bicubic_upsample(to_rgb(low, ds.cond_bands)[None].double(), size)[0]
        return _signed_to_unit(up)
    if ds.task == "temporal":
        frames = sample["cond"]  # (C, T, H, W)
        dates = []
        for vector, mask in zip(sample["cond_metadata"], sample["cond_metadata_mask"], strict=True):
            m = _decode(vector, mask)
            dates.append(f"{m.year:04d}-{m.month:02d}-{m.day:02d}")
        target = _decode(sample["metadata"], sample["metadata_mask"])
        k = nearest_date_index(dates, f"{target.year:04d}-{target.month:02d}-{target.day:02d}")
        return _signed_to_unit(to_rgb(frames[:, k], ds.tiles.bands))
    if ds.task == "inpaint":
        target = _signed_to_unit(sample["pixel_values"]).double().numpy()
        filled = classical_inpaint(target, sample["mask"][0].numpy() > 0.5)
        return torch.from_numpy(filled).float().clamp(0.0, 1.0)
    raise ValueError(f"unknown task {ds.task!r}")


def _hole_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cap: float) -> np.ndarray:
    """PSNR (dB, [0, 1] range) over the masked pixels only, per image. mask (N, 1, H, W), 1 = hole."""
    err = ((pred.double() - target.double()) ** 2 * mask.double()).flatten(1).sum(1)
    count = (mask.double().flatten(1).sum(1) * pred.shape[1]).clamp(min=1.0)
    return (10.0 * torch.log10(1.0 / (err / count))).clamp(max=cap).numpy()


def _trained_degradation(pipeline_dir: Path) -> dict[str, Any] | None:
    """The SR degradation recipe that training recorded beside the pipeline (``task.json``), if any."""
    card = pipeline_dir / "task.json"
    return json.loads(card.read_text()).get("degradation") if card.is_file() else None


def evaluate_controlnet(
    pipeline: Any,
    store_uri: str,
    task: ControlTask,
    *,
    n: int = 16,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 1.0,
    controlnet_conditioning_scale: float = 1.0,
    batch_size: int = 8,
    split: Split = "holdout",
    holdout_fraction: float = 0.1,
    product: str = "rgb",
    cond_product: str = "multispectral",
    degradation: Mapping[str, Any] | None = None,
    sequence_length: int = 3,
    direction: Literal["both", "forward", "backward"] = "both",
    mask_kind: Literal["boxes", "strokes", "mixed"] = "mixed",
    resolution: int | None = None,
    lpips: nn.Module | str | Path | None = None,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> PairedEval:
    """SSIM / PSNR (+ LPIPS) of a `SatControlNetPipeline` and of the task baseline on the same held-out tiles.

    The first ``n`` samples of the task dataset (`dsat_core.data.tasks`) built on ``split``: for ``sr`` the
    degradation recipe is ``degradation`` (default: the one recorded in the pipeline's ``task.json`` by
    training, else `DegradationRecipe()`), the baseline
    is bicubic upsampling of the degraded frame's RGB bands; for ``temporal`` the nearest-date conditioning
    frame; for ``inpaint`` the harmonic fill of the hole (and PSNR over the hole only, ``psnr_hole``).
    Guidance 1.0 by default, as for the paper's metrics. ``lpips``: a local LPIPS weight file / folder /
    module; without it LPIPS is listed in ``skipped``.
    """
    from dsat_core.data.tasks import collate_task_batch
    from dsat_core.evaluation.metrics import PSNR_CAP_DB
    from dsat_core.pipelines import SatControlNetPipeline

    if task not in BASELINES:
        raise ValueError(f"unknown ControlNet task {task!r}; choose one of {sorted(BASELINES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pipe = load_pipeline(pipeline, SatControlNetPipeline, device)
    if degradation is None and isinstance(pipeline, str | Path):
        degradation = _trained_degradation(Path(pipeline))
    ds = _task_dataset(
        task,
        store_uri,
        product=product,
        cond_product=cond_product,
        degradation=degradation,
        sequence_length=sequence_length,
        direction=direction,
        mask_kind=mask_kind,
        seed=seed,
        resolution=resolution,
        split=split,
        holdout_fraction=holdout_fraction,
        storage_options=storage_options,
    )
    if len(ds) == 0:
        raise _empty_split_error(store_uri, product, split, holdout_fraction, f"no {task} samples")
    expected = pipe.controlnet.config.conditioning_channels
    if ds.conditioning_channels != expected:
        raise ValueError(
            f"{task} data of {store_uri} gives {ds.conditioning_channels} conditioning channels "
            f"({ds.recipe.get('cond_bands')}), the ControlNet takes {expected}"
        )
    lpips_model = None
    skipped: dict[str, str] = {}
    if lpips is None:
        skipped["lpips"] = "no local LPIPS weights given (lpips=...); nothing is downloaded"
    else:
        from dsat_core.evaluation.lpips import load_lpips

        lpips_model = load_lpips(lpips) if isinstance(lpips, (str, Path)) else lpips

    count = min(n, len(ds))
    baseline_name = BASELINES[task]
    preds, bases, targets, masks, previews = [], [], [], [], []
    metadata: list[SatMetadata] = []
    prompts: list[str] = []
    seeds = [seed + i for i in range(count)]
    rows_meta: list[dict[str, Any]] = []
    kept_inputs: list[dict[str, torch.Tensor]] = []
    for start in range(0, count, batch_size):
        idx = list(range(start, min(start + batch_size, count)))
        samples = [ds[i] for i in idx]
        batch = collate_task_batch(samples)
        metas = [_decode(s["metadata"], s["metadata_mask"]) for s in samples]
        kwargs: dict[str, Any] = {}
        if task == "inpaint":
            kwargs = {"image": batch["pixel_values"], "mask": batch["mask"]}
        out = pipe(
            batch["cond"],
            batch["cond_metadata"],
            metas,
            list(batch["caption"]),
            cond_metadata_mask=batch["cond_metadata_mask"],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            generator=_generators(seeds[start : start + len(idx)], device),
            output_type="pt",
            **kwargs,
        ).images
        preds.append(out.float().cpu().clamp(0.0, 1.0))
        if sum(len(k["cond"]) for k in kept_inputs) < 8:
            kept_inputs.append(
                {
                    "cond": batch["cond"],
                    "cond_metadata": batch["cond_metadata"],
                    "cond_metadata_mask": batch["cond_metadata_mask"],
                    **kwargs,
                }
            )
        targets.append(_signed_to_unit(batch["pixel_values"]))
        bases.append(torch.stack([_baseline(ds, i, s) for i, s in zip(idx, samples, strict=True)]))
        previews.append(_signed_to_unit(torch.stack([_cond_rgb(ds, s) for s in samples])))
        if task == "inpaint":
            masks.append(batch["mask"].float())
        metadata += metas
        prompts += list(batch["caption"])
        for s in samples:
            rows_meta.append({"tile_index": int(s["index"]), "item_id": s["item_id"]})
    pred, base, target = torch.cat(preds), torch.cat(bases).float(), torch.cat(targets)

    model_m = paired_metrics(pred, target, 1.0, lpips=lpips_model)
    base_m = paired_metrics(base, target, 1.0, lpips=lpips_model)
    per_model, per_base = dict(model_m.per_image), dict(base_m.per_image)
    if task == "inpaint":
        mask = torch.cat(masks)
        per_model["psnr_hole"] = _hole_psnr(pred, target, mask, PSNR_CAP_DB)
        per_base["psnr_hole"] = _hole_psnr(base, target, mask, PSNR_CAP_DB)
    results: dict[str, float] = {}
    for name in per_model:
        results[f"{name}/model"] = float(np.mean(per_model[name]))
        results[f"{name}/{baseline_name}"] = float(np.mean(per_base[name]))
    results["psnr/gain"] = results["psnr/model"] - results[f"psnr/{baseline_name}"]
    results["n_tiles"] = float(count)

    records = []
    for i in range(count):
        row: dict[str, Any] = {"sample": i, **rows_meta[i], **_metadata_record(metadata[i])}
        row.update(caption=prompts[i], seed=seeds[i])
        for name in per_model:
            row[f"{name}_model"] = float(per_model[name][i])
            row[f"{name}_baseline"] = float(per_base[name][i])
        records.append(row)
    params = {
        "kind": task,
        "baseline": baseline_name,
        "n": count,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "controlnet_conditioning_scale": controlnet_conditioning_scale,
        "seed": seed,
        "split": split,
        "holdout_fraction": holdout_fraction,
        "recipe": ds.recipe,
    }
    return PairedEval(
        kind=task,
        baseline=baseline_name,
        metrics=results,
        skipped=skipped,
        records=records,
        images=_to_uint8(pred),
        baselines=_to_uint8(base),
        targets=_to_uint8(target),
        metadata=metadata,
        prompts=prompts,
        seeds=seeds,
        params=params,
        n_eval_tiles=len(ds),
        cond_preview=_to_uint8(torch.cat(previews)),
        inputs={key: torch.cat([k[key] for k in kept_inputs])[:8] for key in kept_inputs[0]},
    )


def _cond_rgb(ds: Any, sample: dict[str, Any]) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: an RGB view of the conditioning (last frame; holes shown as 0)."""
    frame = sample["cond"][:, -1]
    bands = list(ds.recipe.get("cond_bands", []))
    if ds.task == "inpaint":
        frame, bands = frame[:-1], bands[:-1]
    return to_rgb(frame, bands if len(bands) == frame.shape[0] else None)


__all__ = [
    "BASELINES",
    "GenerationEval",
    "PairedEval",
    "evaluate_controlnet",
    "evaluate_generation",
    "load_pipeline",
    "nearest_distance",
    "shared_inception",
]
