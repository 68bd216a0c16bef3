"""Evaluation runs: a trained pipeline against the held-out tiles of a dataset store.

- `evaluate_generation`: sample N images (DiffusionSatPipeline) from the captions and metadata of held-out
  tiles (cycling when there are fewer tiles than samples), FID (with a bootstrap interval) / KID (mean and
  std over subsets) against the real held-out tiles, Inception Score and CLIP score when their local models
  are given (else recorded in `skipped` with why).
- `evaluate_controlnet`: SSIM / PSNR (and LPIPS with local weights) of a SatControlNetPipeline on a task
  (a `dsat_core.data.tasks.ControlNetTask`, by default the one training recorded in ``task.json``) AND of the
  task's classical baseline (bicubic, nearest-date frame, harmonic inpainting) on the SAME held-out tiles,
  with one row per tile; for super-resolution also the LR-consistency of both (`lr_consistency_psnr`). A
  ControlNet with band names takes a store with other bands: they are matched by name, the model's bands
  the store lacks are marked missing (recorded in ``params["missing_bands"]``), unknown ones dropped.

Every result carries its sample sizes beside its metrics (``n_fake`` / ``n_real``, ``n_tiles`` /
``n_sensors``, and per metric in ``params["sample_sizes"]``) and says whether it is a smoke figure (below the
benchmark sizes, `dsat_core.evaluation.metrics.is_smoke_figure`).

Both return plain results (uint8 images, per-sample rows, metric dicts) that `report.py` turns into grids,
quality maps and STAC catalogs. Nothing here logs anywhere: the `evaluate` flow does that. Every pipeline
call goes through `sample_images`: sample i uses the generator seed ``seed + i`` (recorded per row and in
STAC), so any single image can be regenerated on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore
from dsat_core.data.tasks import (
    ControlNetTask,
    DataSpec,
    TaskDataset,
    TaskName,
    batch_metadata,
    collate_task_batch,
    resolve_task,
)
from dsat_core.evaluation.metrics import (
    FID_BOOTSTRAP_RESAMPLES,
    FID_INTERVAL_LEVEL,
    ImageMetrics,
    fid_bootstrap,
    is_smoke_figure,
    kid_subset_size,
    lr_consistency_psnr,
    metric_sample_size,
    paired_metrics,
)
from dsat_core.imaging.rgb import to_rgb
from dsat_core.metadata import FIELD_NAMES, SatMetadata

Split = Literal["train", "holdout"] | None
GENERATION_METRICS = ("fid", "kid", "is", "clip")
SENSITIVITY_INPUTS = 8
"""How many samples' conditioning inputs a ControlNet evaluation keeps for the sensitivity report."""


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
def load_pipeline(pipeline: Any, cls: type[Any], device: str | torch.device = "cpu") -> Any:
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


def sample_images(
    pipe: Any,
    prompts: Sequence[str],
    metadata: Sequence[SatMetadata],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    conditioning: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> torch.Tensor:
    """One pipeline call: float (N, 3, H, W) in [0, 1], on the CPU.

    Image k starts from the noise of a generator seeded ``seeds[k]`` on the pipeline's device, so any image
    can be regenerated alone. ``conditioning``: a `SatControlNetPipeline`'s keyword inputs
    (`ControlNetTask.conditioning`); ``options``: other arguments of the call (e.g. the ControlNet scale).
    """
    generators = [torch.Generator(device=pipe.device).manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts),
        metadata=list(metadata),
        **(conditioning or {}),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="pt",
        **options,
    ).images
    return out.float().cpu().clamp(0.0, 1.0)


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


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


def _metadata_record(meta: SatMetadata) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = getattr(meta, name)
        out[name] = None if value is None else (round(float(value), 6) if isinstance(value, float) else value)
    return out


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
class _HeldOutTiles:
    """The tiles a generation run conditions on and compares with, each read once."""

    def __init__(self, tiles: TileDataset) -> None:
        self.tiles = tiles
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, pos: int) -> dict[str, Any]:
        if pos not in self._cache:
            sample = self.tiles[pos]
            sample["rgb"] = to_rgb(sample["pixel_values"], self.tiles.bands)
            self._cache[pos] = sample
        return self._cache[pos]

    def metadata(self, pos: int) -> SatMetadata:
        sample = self[pos]
        return SatMetadata.decode(sample["metadata"].double().numpy(), sample["metadata_mask"].numpy())

    def rgb_uint8(self, positions: Sequence[int]) -> np.ndarray:
        return np.stack([_to_uint8(_signed_to_unit(self[p]["rgb"])) for p in positions])


def _check_generation_request(metrics: Sequence[str], n_samples: int) -> None:
    unknown = set(metrics) - set(GENERATION_METRICS)
    if unknown:
        raise ValueError(f"unknown generation metrics {sorted(unknown)}; choose from {GENERATION_METRICS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    distribution = [m for m in ("fid", "kid") if m in metrics]
    if distribution and n_samples < 2:
        raise ValueError(f"{'/'.join(distribution)} need at least 2 samples, got n_samples={n_samples}")


def _generate(
    pipe: Any,
    prompts: Sequence[str],
    metadata: Sequence[SatMetadata],
    seeds: Sequence[int],
    batch_size: int,
    **sampling: Any,
) -> np.ndarray:
    """uint8 (N, 3, H, W): `sample_images` over batches."""
    images = [
        sample_images(
            pipe, [prompts[i] for i in b], [metadata[i] for i in b], [seeds[i] for i in b], **sampling
        )
        for b in _batches(len(prompts), batch_size)
    ]
    return _to_uint8(torch.cat(images))


def _distribution_scores(
    fake: np.ndarray,
    real: np.ndarray,
    distribution: Sequence[str],
    inception: nn.Module | None,
    seed: int,
    kid_subsets: int,
    fid_resamples: int = FID_BOOTSTRAP_RESAMPLES,
) -> tuple[dict[str, float], np.ndarray, str]:
    """FID (+ its bootstrap interval: ``fid_ci_low`` / ``fid_ci_high``, ``fid_bootstrap_bias``) / KID, and
    each sample's distance to the nearest real tile (Inception space, else RMS pixels)."""
    if not distribution:
        if fake.shape[1:] != real.shape[1:]:
            raise ValueError(f"generated {fake.shape[1:]} and real {real.shape[1:]} images differ in shape")
        flat_f = fake.reshape(len(fake), -1).astype(np.float64) / 255.0
        flat_r = real.reshape(len(real), -1).astype(np.float64) / 255.0
        return {}, nearest_distance(flat_f, flat_r) / np.sqrt(flat_f.shape[1]), "pixel"
    net = inception if inception is not None else shared_inception()
    real_f = net(torch.from_numpy(real)).cpu().numpy().astype(np.float64)
    fake_f = net(torch.from_numpy(fake)).cpu().numpy().astype(np.float64)
    meter = ImageMetrics(
        distribution,
        inception=net,
        seed=seed,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size(len(real_f), len(fake_f)),
    )
    meter.update_features(real=real_f, fake=fake_f)
    scores = {k: v for k, v in meter.compute().items() if not k.startswith("n_")}
    if "fid" in distribution and fid_resamples > 0:
        interval = fid_bootstrap(real_f, fake_f, resamples=fid_resamples, seed=seed)
        scores.update(fid_ci_low=interval.low, fid_ci_high=interval.high, fid_bootstrap_bias=interval.bias)
    return scores, nearest_distance(fake_f, real_f), "inception"


def _model_scores(
    fake: np.ndarray,
    prompts: Sequence[str],
    metrics: Sequence[str],
    logits_model: nn.Module | str | Path | None,
    clip_model: Any,
    seed: int,
) -> tuple[dict[str, float], dict[str, str]]:
    """Inception Score and CLIP score where asked for; metric → reason for those without a local model."""
    from dsat_core.evaluation.clip import CLIPUnavailable
    from dsat_core.evaluation.inception import InceptionScoreUnavailable

    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if "is" in metrics:
        try:
            meter = ImageMetrics(["is"], logits_model=logits_model, seed=seed, is_splits=min(10, len(fake)))
        except InceptionScoreUnavailable as err:
            skipped["is"] = str(err)
        else:
            meter.update(fake=fake)
            scores.update({k: v for k, v in meter.compute().items() if k.startswith("is_")})
    if "clip" in metrics:
        try:
            meter = ImageMetrics(["clip"], clip=clip_model, seed=seed)
        except CLIPUnavailable as err:
            skipped["clip"] = str(err)
        else:
            meter.update(fake=fake, prompts=list(prompts))
            scores["clip_score"] = meter.compute()["clip_score"]
    return scores, skipped


@dataclass
class _Conditions:
    """What each generated sample is conditioned on: a held-out tile's caption and metadata, and a seed."""

    positions: list[int]
    metadata: list[SatMetadata]
    prompts: list[str]
    seeds: list[int]


def _held_out_tiles(
    store_uri: str,
    product: str,
    size: int,
    split: Split,
    holdout_fraction: float,
    min_tiles: int,
    storage_options: Mapping[str, Any] | None,
) -> _HeldOutTiles:
    """The split's tiles, read at ``size`` px; a clear error below ``min_tiles``."""
    tiles = _HeldOutTiles(
        TileDataset(
            store_uri,
            product,
            resolution=size,
            split=split,
            holdout_fraction=holdout_fraction,
            storage_options=storage_options,
        )
    )
    if len(tiles) < min_tiles:
        raise _empty_split_error(store_uri, product, split, holdout_fraction, f"{len(tiles)} found")
    return tiles


def positions_by_item(item_ids: Sequence[str]) -> dict[str, list[int]]:
    """Each item's positions in ``item_ids``, items in order of first appearance."""
    by_item: dict[str, list[int]] = {}
    for pos, item in enumerate(item_ids):
        by_item.setdefault(str(item), []).append(pos)
    return by_item


def spread_over_items(item_ids: Sequence[str]) -> list[int]:
    """Positions ordered round-robin over items (first tile of each item, then the second, ...).

    Items come in order of first appearance, each item's tiles in their order; a prefix of any length covers
    as many items as it can, so a small sample set still shows every held-out scene.
    """
    groups = list(positions_by_item(item_ids).values())
    rounds = max((len(g) for g in groups), default=0)
    return [group[r] for r in range(rounds) for group in groups if r < len(group)]


def _conditions(tiles: _HeldOutTiles, n_samples: int, seed: int) -> _Conditions:
    """Held-out tiles spread over their items (`spread_over_items`), cycling when there are fewer than
    samples; sample i gets seed ``seed + i``."""
    order = spread_over_items(tiles.tiles.item_ids)
    positions = [order[i % len(order)] for i in range(n_samples)]
    return _Conditions(
        positions=positions,
        metadata=[tiles.metadata(p) for p in positions],
        prompts=[tiles[p]["caption"] for p in positions],
        seeds=[seed + i for i in range(n_samples)],
    )


def _real_set(tiles: _HeldOutTiles, n_samples: int, max_real: int | None) -> np.ndarray:
    """uint8 real tiles evenly spread over the split: as many as samples (at least 2), or ``max_real``."""
    n_real = min(len(tiles), max_real if max_real is not None else max(n_samples, 2))
    return tiles.rgb_uint8(np.unique(np.linspace(0, len(tiles) - 1, n_real).round().astype(int)).tolist())


def _generation_records(
    tiles: _HeldOutTiles, conditions: _Conditions, nearest: np.ndarray
) -> list[dict[str, Any]]:
    """One row per sample: its tile, metadata, caption, seed and distance to the nearest real tile."""
    return [
        {
            "sample": i,
            "tile_index": int(tiles[pos]["index"]),
            "item_id": tiles[pos]["item_id"],
            **_metadata_record(conditions.metadata[i]),
            "caption": conditions.prompts[i],
            "seed": conditions.seeds[i],
            "nearest_real_distance": float(nearest[i]),
        }
        for i, pos in enumerate(conditions.positions)
    ]


def _resampling_params(
    distribution: Sequence[str], fid_resamples: int, kid_subsets: int, n_real: int, n_fake: int
) -> dict[str, Any]:
    """How the FID interval and the KID std were resampled (for the run's params)."""
    params: dict[str, Any] = {}
    if "fid" in distribution and fid_resamples > 0:
        params.update(fid_interval_level=FID_INTERVAL_LEVEL, fid_bootstrap_resamples=fid_resamples)
    if "kid" in distribution:
        params.update(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size(n_real, n_fake))
    return params


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
    fid_resamples: int = FID_BOOTSTRAP_RESAMPLES,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> GenerationEval:
    """Generate ``n_samples`` images for held-out metadata + captions and compare them with the real tiles.

    ``pipeline``: a `DiffusionSatPipeline` or its `save_pretrained` folder. Real tiles are read at the
    pipeline's output size (their metadata then carries the effective GSD, as in training). ``max_real``: how
    many held-out tiles form the real set (default: as many as samples; evenly spread over the split).
    ``metrics``: any of fid, kid, is, clip; IS needs ``logits_model``, CLIP ``clip_model`` (local files): when
    missing they are recorded in ``skipped`` with the reason instead of failing the run.
    FID comes with a ``FID_INTERVAL_LEVEL`` bootstrap interval over ``fid_resamples`` resamples (0: none),
    KID with its std over ``kid_subsets`` subsets of half the smaller set (`kid_subset_size`).
    Per sample, ``nearest_real_distance`` is the L2 distance of its Inception features to the nearest real
    tile's (pixel-space RMS distance when neither fid nor kid is computed): a per-sample realism proxy
    that the quality map bins by location.
    """
    from dsat_core.pipelines import DiffusionSatPipeline

    # 1. check the request, load the pipeline once, read the held-out tiles
    _check_generation_request(metrics, n_samples)
    distribution = [m for m in ("fid", "kid") if m in metrics]
    pipe = load_pipeline(pipeline, DiffusionSatPipeline, device)
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)  # the real tiles are read at this size
    min_tiles = 2 if distribution else 1
    tiles = _held_out_tiles(store_uri, product, size, split, holdout_fraction, min_tiles, storage_options)

    # 2. generate one image per held-out condition (cycling)
    conditions = _conditions(tiles, n_samples, seed)
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    fake = _generate(pipe, conditions.prompts, conditions.metadata, conditions.seeds, batch_size, **sampling)

    # 3. score against the real set: FID / KID (+ nearest real tile per sample), then IS / CLIP
    real = _real_set(tiles, n_samples, max_real)
    results, nearest, space = _distribution_scores(
        fake, real, distribution, inception, seed, kid_subsets, fid_resamples
    )
    scores, skipped = _model_scores(fake, conditions.prompts, metrics, logits_model, clip_model, seed)
    results.update(scores, n_real=float(len(real)), n_fake=float(len(fake)))

    # 4. rows and params, each metric with its sample size
    params = {
        "kind": "generation",
        "product": product,
        "n_samples": n_samples,
        **sampling,
        "seed": seed,
        "split": split,
        "holdout_fraction": holdout_fraction,
        "resolution": size,
        "metrics": ",".join(metrics),
        "nearest_real_space": space,
        "sample_sizes": sample_sizes(results),
        "smoke_figure": is_smoke_figure("generation", results),
        **_resampling_params(distribution, fid_resamples, kid_subsets, len(real), len(fake)),
    }
    return GenerationEval(
        metrics=results,
        skipped=skipped,
        records=_generation_records(tiles, conditions, nearest),
        images=fake,
        real_images=real,
        metadata=conditions.metadata,
        prompts=conditions.prompts,
        seeds=conditions.seeds,
        params=params,
        n_eval_tiles=len(tiles),
        references=tiles.rgb_uint8(conditions.positions),
        map_label=f"distance to nearest real held-out tile ({space} space)",
    )


# ---------------------------------------------------------------------------------------------- controlnet
@dataclass
class _PairedRun:
    """The model's outputs next to the baseline's and the targets (float [0, 1]), sample by sample."""

    preds: torch.Tensor
    baselines: torch.Tensor
    targets: torch.Tensor
    previews: torch.Tensor
    fill: torch.Tensor | None
    metadata: list[SatMetadata]
    prompts: list[str]
    tiles: list[dict[str, Any]]
    inputs: dict[str, Any]
    lr_model: np.ndarray | None = None
    lr_baseline: np.ndarray | None = None


def _check_bands(
    task: ControlNetTask, dataset: TaskDataset, pipe: Any, store_uri: str
) -> tuple[list[str] | None, dict[str, Any]]:
    """The band names to pass with the conditioning (None: channels by position) and what to record.

    A ControlNet with band names (``conditioning_bands``) takes the store's bands by name
    (`ControlNetTask.band_alignment`): its bands the store lacks are marked missing, store bands it does not
    know are dropped with a warning naming them. One without names needs the same number of channels.
    """
    model_bands = pipe.controlnet.config.get("conditioning_bands")
    if model_bands is None:
        expected = pipe.controlnet.config.conditioning_channels
        if dataset.conditioning_channels != expected:
            raise ValueError(
                f"{task.name} data of {store_uri} gives {dataset.conditioning_channels} conditioning "
                f"channels ({dataset.cond_bands}), the ControlNet takes {expected}"
            )
        return None, {"cond_bands": dataset.cond_bands}
    alignment = task.band_alignment(dataset, model_bands)
    if alignment.unknown:
        warnings.warn(
            f"{store_uri}: bands {list(alignment.unknown)} are unknown to the ControlNet (it takes "
            f"{list(model_bands)}); they are dropped",
            stacklevel=3,
        )
    record = {
        "cond_bands": dataset.cond_bands,
        "model_bands": list(model_bands),
        "missing_bands": list(alignment.missing),
        "unknown_bands": list(alignment.unknown),
    }
    return dataset.cond_bands, record


def _platforms(
    store_uri: str, product: str, rows: Sequence[int], storage_options: Mapping[str, Any] | None
) -> list[str]:
    """The recorded platform (sensor) of each of ``rows`` of ``product`` (an empty name when unknown)."""
    store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
    column = np.asarray(store.product_group(product)["platform"][: store.n_tiles(product)])
    return [str(column[r]) for r in rows]


def _lpips_model(lpips: nn.Module | str | Path | None) -> tuple[nn.Module | None, dict[str, str]]:
    """The LPIPS network, or None and why LPIPS is skipped."""
    if lpips is None:
        return None, {"lpips": "no local LPIPS weights given (lpips=...); nothing is downloaded"}
    from dsat_core.evaluation.lpips import load_lpips

    return (load_lpips(lpips) if isinstance(lpips, (str, Path)) else lpips), {}


@dataclass
class _PairedBatch:
    """One batch of a paired run: model output in [0, 1]; baseline, target and preview in [-1, 1]."""

    start: int
    pred: torch.Tensor
    baseline: torch.Tensor
    target: torch.Tensor
    preview: torch.Tensor
    fill: torch.Tensor | None
    conditioning: dict[str, Any]
    metadata: list[SatMetadata]
    prompts: list[str]
    tiles: list[dict[str, Any]]
    lr_model: list[float]
    lr_baseline: list[float]


def _lr_pairs(
    task: ControlNetTask, dataset: TaskDataset, indices: range, pred: torch.Tensor, base: torch.Tensor
) -> tuple[list[float], list[float]]:
    """LR-consistency PSNR of model and baseline per sample, where the task defines it (`lowres_views`)."""
    lr_model: list[float] = []
    lr_base: list[float] = []
    for k, i in enumerate(indices):
        model_view = task.lowres_views(dataset, i, pred[k].double() * 2.0 - 1.0)
        base_view = None if model_view is None else task.lowres_views(dataset, i, base[k].double())
        if model_view is not None and base_view is not None:
            lr_model.append(_lr_psnr(*model_view))
            lr_base.append(_lr_psnr(*base_view))
    return lr_model, lr_base


def _consistent(task: ControlNetTask, dataset: TaskDataset, i: int, image: torch.Tensor) -> torch.Tensor:
    """`ControlNetTask.consistent` of one output (3, H, W) in [0, 1], on the same scale."""
    return ((task.consistent(dataset, i, image.double() * 2.0 - 1.0) + 1.0) / 2.0).to(image.dtype)


def _paired_batch(
    pipe: Any,
    task: ControlNetTask,
    dataset: TaskDataset,
    indices: range,
    seeds: Sequence[int],
    cond_bands: Sequence[str] | None,
    strength: float,
    **sampling: Any,
) -> _PairedBatch:
    """The task baseline, then the model on the same samples (made `ControlNetTask.consistent` with what the
    task observed); with ``strength`` < 1 the model starts from the baseline noised to that fraction of the
    schedule (``init_image``, as image-to-image pipelines do)."""
    samples = [dataset[i] for i in indices]
    batch = collate_task_batch(samples)
    metas, captions = batch_metadata(batch), list(batch["caption"])
    conditioning = task.conditioning(batch, cond_bands)
    base = torch.stack([task.baseline(dataset, i, s) for i, s in zip(indices, samples, strict=True)])
    start: dict[str, Any] = {} if strength >= 1.0 else {"init_image": base.float(), "strength": strength}
    raw = sample_images(
        pipe, captions, metas, [seeds[i] for i in indices], conditioning=conditioning, **start, **sampling
    )
    pred = torch.stack([_consistent(task, dataset, i, image) for i, image in zip(indices, raw, strict=True)])
    lr_model, lr_base = _lr_pairs(task, dataset, indices, pred, base)
    return _PairedBatch(
        start=indices.start,
        pred=pred,
        baseline=base,
        target=batch["pixel_values"],
        preview=torch.stack([task.cond_preview(dataset, s) for s in samples]),
        fill=task.fill_mask(batch),
        conditioning=conditioning,
        metadata=metas,
        prompts=captions,
        tiles=[{"tile_index": int(s["index"]), "item_id": s["item_id"]} for s in samples],
        lr_model=lr_model,
        lr_baseline=lr_base,
    )


def _sensitivity_inputs(parts: Sequence[_PairedBatch]) -> dict[str, Any]:
    """The conditioning inputs of the first `SENSITIVITY_INPUTS` samples (band names: once)."""
    kept = [p.conditioning for p in parts if p.start < SENSITIVITY_INPUTS]
    return {
        key: torch.cat([k[key] for k in kept])[:SENSITIVITY_INPUTS]
        if isinstance(kept[0][key], torch.Tensor)
        else kept[0][key]  # the same for every sample (band names)
        for key in kept[0]
    }


def _run_paired(
    pipe: Any,
    task: ControlNetTask,
    dataset: TaskDataset,
    seeds: Sequence[int],
    batch_size: int,
    cond_bands: Sequence[str] | None = None,
    strength: float = 1.0,
    **sampling: Any,
) -> _PairedRun:
    """Model, baseline and conditioning preview on samples 0 … len(seeds)-1, batch by batch."""
    parts = [
        _paired_batch(pipe, task, dataset, indices, seeds, cond_bands, strength, **sampling)
        for indices in _batches(len(seeds), batch_size)
    ]
    fills = [p.fill for p in parts if p.fill is not None]
    lr_model = [v for p in parts for v in p.lr_model]
    lr_base = [v for p in parts for v in p.lr_baseline]
    return _PairedRun(
        preds=torch.cat([p.pred for p in parts]),
        baselines=_signed_to_unit(torch.cat([p.baseline for p in parts])),
        targets=_signed_to_unit(torch.cat([p.target for p in parts])),
        previews=_signed_to_unit(torch.cat([p.preview for p in parts])),
        fill=torch.cat(fills) if fills else None,
        metadata=[m for p in parts for m in p.metadata],
        prompts=[c for p in parts for c in p.prompts],
        tiles=[t for p in parts for t in p.tiles],
        inputs=_sensitivity_inputs(parts),
        lr_model=np.array(lr_model) if lr_model else None,
        lr_baseline=np.array(lr_base) if lr_base else None,
    )


def _lr_psnr(output_lowres: torch.Tensor, input_lowres: torch.Tensor) -> float:
    """`lr_consistency_psnr` of one (C, h, w) pair in [-1, 1], on the [0, 1] scale of the other PSNRs."""
    output_unit, input_unit = (((x.double() + 1.0) / 2.0)[None] for x in (output_lowres, input_lowres))
    return float(lr_consistency_psnr(output_unit, input_unit)[0])


def _hole_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cap: float) -> np.ndarray:
    """PSNR (dB, [0, 1] range) over the masked pixels only, per image. mask (N, 1, H, W), 1 = hole."""
    err = ((pred.double() - target.double()) ** 2 * mask.double()).flatten(1).sum(1)
    count = (mask.double().flatten(1).sum(1) * pred.shape[1]).clamp(min=1.0)
    return (10.0 * torch.log10(1.0 / (err / count))).clamp(max=cap).numpy()


def _per_image_scores(
    images: torch.Tensor, run: _PairedRun, lpips_model: nn.Module | None
) -> dict[str, np.ndarray]:
    """PSNR / SSIM (/ LPIPS) of each image against its target; ``psnr_hole`` where the task fills a hole."""
    from dsat_core.evaluation.metrics import PSNR_CAP_DB

    scores = dict(paired_metrics(images, run.targets, 1.0, lpips=lpips_model).per_image)
    if run.fill is not None:
        scores["psnr_hole"] = _hole_psnr(images, run.targets, run.fill, PSNR_CAP_DB)
    return scores


def sample_sizes(metrics: Mapping[str, float]) -> dict[str, str]:
    """Per metric, the sample size it was computed on (`metric_sample_size`), for the run's params."""
    return {k: size for k in metrics if (size := metric_sample_size(k, metrics)) is not None}


def _side_by_side(
    model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], baseline_name: str
) -> dict[str, float]:
    """``<metric>/model`` next to ``<metric>/<baseline>``, ``psnr/gain`` and ``n_tiles``."""
    results: dict[str, float] = {}
    for name in model:
        results[f"{name}/model"] = float(np.mean(model[name]))
        results[f"{name}/{baseline_name}"] = float(np.mean(base[name]))
    results["psnr/gain"] = results["psnr/model"] - results[f"psnr/{baseline_name}"]
    results["n_tiles"] = float(len(next(iter(model.values()))))
    return results


def _with_lr_consistency(
    model: dict[str, np.ndarray], base: dict[str, np.ndarray], run: _PairedRun
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The per-image scores with ``lr_psnr`` added where the task has an LR-consistency."""
    if run.lr_model is None or run.lr_baseline is None:
        return model, base
    return {**model, "lr_psnr": run.lr_model}, {**base, "lr_psnr": run.lr_baseline}


def _task_dataset(task: ControlNetTask, spec: DataSpec) -> TaskDataset:
    """The task's dataset over the split; a clear error when it has no samples."""
    dataset = task.dataset(spec)
    if len(dataset) == 0:
        raise _empty_split_error(
            spec.store_uri, task.product, spec.split, spec.holdout_fraction, f"no {task.name} samples"
        )
    return dataset


def _paired_records(
    run: _PairedRun,
    seeds: Sequence[int],
    platforms: Sequence[str],
    per_model: Mapping[str, np.ndarray],
    per_base: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """One row per tile: tile, metadata, sensor, caption, seed and each metric of model and baseline."""
    records = []
    for i, seed in enumerate(seeds):
        row: dict[str, Any] = {"sample": i, **run.tiles[i], **_metadata_record(run.metadata[i])}
        row.update(platform=platforms[i], caption=run.prompts[i], seed=seed)
        for name in per_model:
            row[f"{name}_model"] = float(per_model[name][i])
            row[f"{name}_baseline"] = float(per_base[name][i])
        records.append(row)
    return records


def evaluate_controlnet(
    pipeline: Any,
    store_uri: str,
    task: ControlNetTask | TaskName,
    *,
    n: int = 16,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 1.0,
    controlnet_conditioning_scale: float = 1.0,
    strength: float = 1.0,
    batch_size: int = 8,
    split: Split = "holdout",
    holdout_fraction: float = 0.1,
    resolution: int | None = None,
    lpips: nn.Module | str | Path | None = None,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> PairedEval:
    """SSIM / PSNR (+ LPIPS) of a `SatControlNetPipeline` and of the task baseline on the same held-out tiles.

    ``task``: a `ControlNetTask`, or a task name: then the task training recorded in the pipeline folder's
    ``task.json`` (`resolve_task`), or that task's defaults without one. The first ``n`` samples of its
    dataset, targets from ``split`` (a held-out target's conditioning may be any tile); the baseline is the
    task's (`ControlNetTask.baseline`), and a task that fills a hole is also scored over the hole only
    (``psnr_hole``). Guidance 1.0 by default, as for the paper's metrics. ``strength`` < 1: each sample
    starts from its baseline noised to that fraction of the schedule (image-to-image) instead of pure noise.
    ``lpips``: a local LPIPS weight file / folder / module; without it LPIPS is listed in ``skipped``.
    """
    from dsat_core.pipelines import SatControlNetPipeline

    # 1. the task (from the pipeline's card), the pipeline loaded once, the task's dataset over the split
    task = resolve_task(task, pipeline if isinstance(pipeline, (str, Path)) else None)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    pipe = load_pipeline(pipeline, SatControlNetPipeline, device)
    spec = DataSpec(
        store_uri,
        resolution=resolution,
        split=split,
        holdout_fraction=holdout_fraction,
        split_conditioning=False,
        seed=seed,
        storage_options=storage_options,
    )
    dataset = _task_dataset(task, spec)

    # 2. the conditioning bands by name; LPIPS when its weights are given
    cond_bands, band_record = _check_bands(task, dataset, pipe, store_uri)
    lpips_model, skipped = _lpips_model(lpips)

    # 3. model and baseline on the same samples
    seeds = [seed + i for i in range(min(n, len(dataset)))]
    sampling = dict(
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=controlnet_conditioning_scale,
    )
    run = _run_paired(pipe, task, dataset, seeds, batch_size, cond_bands, strength, **sampling)

    # 4. per-image scores of both, side by side, with the tiles' sensors
    per_model, per_base = _with_lr_consistency(
        _per_image_scores(run.preds, run, lpips_model),
        _per_image_scores(run.baselines, run, lpips_model),
        run,
    )
    if run.lr_model is None:
        skipped["lr_psnr"] = f"the {task.name} task has no low-resolution input to be consistent with"
    platforms = _platforms(store_uri, task.product, [t["tile_index"] for t in run.tiles], storage_options)
    metrics = _side_by_side(per_model, per_base, task.baseline_name)
    metrics["n_sensors"] = float(len({p for p in platforms if p}))

    # 5. rows and params, each metric with its sample size
    params = {
        "kind": task.name,
        "baseline": task.baseline_name,
        "n": len(seeds),
        **sampling,
        "strength": strength,
        "seed": seed,
        "split": split,
        "holdout_fraction": holdout_fraction,
        "recipe": dataset.recipe,
        **band_record,
        "sensors": sorted({p for p in platforms if p}),
        "sample_sizes": sample_sizes(metrics),
        "smoke_figure": is_smoke_figure(task.name, metrics),
    }
    return PairedEval(
        kind=task.name,
        baseline=task.baseline_name,
        metrics=metrics,
        skipped=skipped,
        records=_paired_records(run, seeds, platforms, per_model, per_base),
        images=_to_uint8(run.preds),
        baselines=_to_uint8(run.baselines),
        targets=_to_uint8(run.targets),
        metadata=run.metadata,
        prompts=run.prompts,
        seeds=seeds,
        params=params,
        n_eval_tiles=len(dataset),
        cond_preview=_to_uint8(run.previews),
        inputs=run.inputs,
    )


__all__ = [
    "GenerationEval",
    "PairedEval",
    "evaluate_controlnet",
    "evaluate_generation",
    "load_pipeline",
    "nearest_distance",
    "positions_by_item",
    "sample_sizes",
    "sample_images",
    "shared_inception",
    "spread_over_items",
]
