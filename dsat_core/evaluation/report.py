"""What an evaluation leaves behind: sample grids, the quality map, the metadata sensitivity report, the STAC
catalog of generated images and a markdown summary. Pure functions over `runner` results (no MLflow here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dsat_core.evaluation.geo_map import plot_quality_map
from dsat_core.evaluation.metrics import (
    BENCH_MIN_GENERATION,
    BENCH_MIN_SR_SENSORS,
    BENCH_MIN_SR_TILES,
    SAMPLE_SIZE_KEYS,
    is_smoke_figure,
    metric_sample_size,
)
from dsat_core.evaluation.runner import GenerationEval, PairedEval, positions_by_item, sample_images
from dsat_core.evaluation.sensitivity import robustness, sensitivity_details, shuffled_metadata
from dsat_core.evaluation.stac_output import validate_catalog, write_generated_stac
from dsat_core.imaging.rgb import image_grid
from dsat_core.metadata import SatMetadata

Evaluation = GenerationEval | PairedEval
# One field at a time (spec §1/§5: does changing lat/lon/month change the output?); gsd: x base gsd.
SENSITIVITY_VALUES: dict[str, tuple[float, ...]] = {
    "lon": (-150.0, -90.0, -30.0, 30.0, 90.0, 150.0),
    "lat": (-60.0, -30.0, 0.0, 30.0, 60.0),
    "gsd": (0.25, 0.5, 2.0, 4.0),
    "cloud_cover": (0.0, 0.5, 1.0),
    "month": (1, 4, 7, 10),
}


# ---------------------------------------------------------------------------------------------- grids
def sample_grid(result: Evaluation, max_rows: int = 8) -> Image.Image:
    """Generation: a row per held-out scene (`generation_rows`), labelled with its item. Paired: per tile,
    conditioning | baseline | model | target."""
    if isinstance(result, GenerationEval):
        rows = generation_rows(result, max_rows=max_rows)
        first = "held-out tile, then samples" if result.references is not None else "samples"
        labels = [f"{item}  ({first})" if k == 0 else item for k, item in enumerate(rows)]
        return image_grid(
            np.concatenate(list(rows.values())).transpose(0, 2, 3, 1),
            columns=len(next(iter(rows.values()))),
            row_labels=labels,
        )
    k = min(max_rows, len(result.images))
    parts = [result.baselines[:k], result.images[:k], result.targets[:k]]
    if result.cond_preview is not None:
        parts.insert(0, result.cond_preview[:k])
    images = np.stack(parts, axis=1).reshape(-1, *result.images.shape[1:])
    return image_grid(images.transpose(0, 2, 3, 1), columns=len(parts))


def generation_rows(result: GenerationEval, max_rows: int = 8, max_samples: int = 8) -> dict[str, np.ndarray]:
    """Per item (up to ``max_rows``, in order of first sample), uint8 (1 + k, 3, H, W): the real tile the
    item's first sample was conditioned on, then up to ``max_samples`` of the item's samples; white padding
    makes the rows equally long. Without references (older results) a row holds only samples."""
    by_item = positions_by_item([record["item_id"] for record in result.records])
    groups = {item: idx[:max_samples] for item, idx in list(by_item.items())[:max_rows]}
    width = max(len(g) for g in groups.values()) + (result.references is not None)
    blank = np.full(result.images.shape[1:], 255, np.uint8)
    rows = {}
    for item, idx in groups.items():
        row = ([result.references[idx[0]]] if result.references is not None else []) + [
            result.images[i] for i in idx
        ]
        rows[item] = np.stack(row + [blank] * (width - len(row)))
    return rows


# ---------------------------------------------------------------------------------------------- map
def write_quality_map(result: Evaluation, path: str | Path, bin_deg: float = 10) -> Path:
    """PNG world map of ``result.map_metric`` per ``bin_deg`` lat/lon cell (numbers: samples per cell)."""
    rows = [r for r in result.records if r.get("lon") is not None and r.get("lat") is not None]
    if not rows:
        raise ValueError("quality map: no evaluated sample has lon/lat metadata")
    return plot_quality_map(
        np.array([r["lon"] for r in rows], np.float64),
        np.array([r["lat"] for r in rows], np.float64),
        np.array([r[result.map_metric] for r in rows], np.float64),
        path,
        bin_deg=bin_deg,
        metric_name=result.map_label,
        title=f"{result.kind}: {result.map_label} per {bin_deg:g} deg cell (numbers: samples)",
    )


# ---------------------------------------------------------------------------------------------- sensitivity
def make_sample_fn(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    cond: Mapping[str, torch.Tensor] | None = None,
) -> Callable[[list[SatMetadata], int], np.ndarray]:
    """`sample_fn(metadata_list, seed) -> (N, 3, H, W)` floats in [0, 1], for `evaluation.sensitivity`.

    Every image of a call starts from the SAME noise (`sample_images` with every seed ``seed``), so only the
    metadata differs. ``prompts``: one caption for all, or one per metadata entry. ``cond``: for a
    `SatControlNetPipeline`, keyword inputs (``cond``, ``cond_metadata``, ``cond_metadata_mask``, and for
    inpainting ``image`` / ``mask``) with batch 1 (shared) or one per metadata entry; entries that are no
    tensors (``cond_bands``) are passed as they are.
    """

    def sample_fn(metadata: list[SatMetadata], seed: int) -> np.ndarray:
        k = len(metadata)
        captions = [prompts] * k if isinstance(prompts, str) else list(prompts)
        if len(captions) != k:
            raise ValueError(f"{len(captions)} prompts for {k} metadata entries")
        inputs = None
        if cond is not None:
            inputs = {
                key: (
                    value.expand(k, *value.shape[1:])
                    if isinstance(value, torch.Tensor) and value.shape[0] == 1
                    else value
                )
                for key, value in cond.items()
            }
            if any(isinstance(v, torch.Tensor) and v.shape[0] != k for v in inputs.values()):
                raise ValueError(f"conditioning batch does not match {k} metadata entries")
        images = sample_images(
            pipe,
            captions,
            metadata,
            [seed] * k,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            conditioning=inputs,
        )
        return images.numpy()

    return sample_fn


def default_sensitivity_values(base: SatMetadata) -> dict[str, list[Any]]:
    """`SENSITIVITY_VALUES` with gsd as multiples of the base GSD (absolute 1/10/30/100 m when unknown)."""
    values: dict[str, list[Any]] = {k: list(v) for k, v in SENSITIVITY_VALUES.items()}
    values["gsd"] = (
        [round(base.gsd * f, 6) for f in SENSITIVITY_VALUES["gsd"]] if base.gsd else [1.0, 10.0, 30.0, 100.0]
    )
    return values


def metadata_sensitivity(
    sample_fn: Callable[[list[SatMetadata], int], np.ndarray],
    base_metadata: SatMetadata,
    *,
    seed: int,
    fields_and_values: Mapping[str, Sequence[Any]] | None = None,
    correct: Sequence[SatMetadata] | None = None,
    reference: np.ndarray | None = None,
    robustness_fn: Callable[[list[SatMetadata], int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Sensitivity (one field at a time, same seed) and robustness (correct vs shuffled metadata) report.

    ``sample_fn`` samples the base caption for the sensitivity part. Robustness (when ``correct`` holds >= 2
    entries) samples ``robustness_fn`` (default ``sample_fn``; typically one caption per entry of
    ``correct``) with the correct and with deranged metadata. ``reference``: real images aligned with
    ``correct`` (float [0, 1], the sample size), for the error of both (``error_increase`` > 0: the metadata
    helps). The report is JSON-ready.
    """
    values = dict(fields_and_values or default_sensitivity_values(base_metadata))
    details = sensitivity_details(sample_fn, base_metadata, values, seed)
    report: dict[str, Any] = {
        "units": "mean absolute pixel change, images in [0, 1]",
        "seed": seed,
        "base_metadata": base_metadata.to_dict(),
        "fields": {f: float(np.mean([c for _, c in rows])) for f, rows in details.items()},
        "values": {f: [[v, c] for v, c in rows] for f, rows in details.items()},
    }
    if correct is not None and len(correct) >= 2:
        wrong = shuffled_metadata(list(correct), seed)
        fn = robustness_fn or sample_fn
        report["robustness"] = robustness(fn, list(correct), wrong, seed, reference=reference)
        report["robustness"]["n"] = len(correct)
    return report


def evaluation_sensitivity(
    result: Evaluation,
    pipe: Any,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    n: int = 8,
    fields_and_values: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """`metadata_sensitivity` around an evaluation: the base is its first sample (caption, metadata and, for
    a ControlNet, conditioning); robustness shuffles the metadata of its first ``n`` samples and scores both
    against their real tiles (generation: the tile each sample's metadata came from; ControlNet: targets).
    ``pipe``: the evaluated pipeline object, as the evaluation loaded it (on the run's device).
    """
    from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline

    paired = isinstance(result, PairedEval)
    expected = SatControlNetPipeline if paired else DiffusionSatPipeline
    if not isinstance(pipe, expected):
        raise TypeError(
            f"sensitivity of a {result.kind} evaluation runs its {expected.__name__}, got {pipe!r}"
        )
    k = min(n, len(result.metadata))
    cond = base_cond = None
    real: np.ndarray | None
    if isinstance(result, PairedEval):
        if not result.inputs:
            raise ValueError("the ControlNet evaluation kept no conditioning inputs for a sensitivity run")
        k = min(k, len(result.inputs["cond"]))
        cond = _first(result.inputs, k)
        base_cond = _first(cond, 1)
        real = result.targets[:k]
    else:
        real = result.references[:k] if result.references is not None else None
    common: dict[str, Any] = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    base_fn = make_sample_fn(pipe, result.prompts[0], cond=base_cond, **common)
    robust_fn = make_sample_fn(pipe, result.prompts[:k], cond=cond, **common)
    reference = None if real is None else reference_images(real, tuple(result.images.shape[-2:]))
    report = metadata_sensitivity(
        base_fn,
        result.metadata[0],
        seed=seed,
        fields_and_values=fields_and_values,
        correct=result.metadata[:k],
        reference=reference,
        robustness_fn=robust_fn,
    )
    report.update(
        kind=result.kind,
        prompt=result.prompts[0],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    return report


def _first(inputs: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The first ``k`` samples of conditioning inputs (tensors sliced; band names kept whole)."""
    return {key: value[:k] if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def sensitivity_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics for MLflow: ``sensitivity/<field>`` and ``robustness/<key>``."""
    out = {f"sensitivity/{k}": float(v) for k, v in report.get("fields", {}).items()}
    out.update({f"robustness/{k}": float(v) for k, v in report.get("robustness", {}).items()})
    return out


def plot_sensitivity(report: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart (PNG) of the mean pixel change per metadata field, robustness in the title."""
    from matplotlib.figure import Figure

    fields = report["fields"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    names = list(fields)
    ax.bar(names, [fields[n] for n in names], color="tab:blue")
    ax.set_ylabel(report.get("units", "mean absolute change"))
    title = "Metadata sensitivity (one field at a time, same seed)"
    rob = report.get("robustness")
    if rob:
        title += f"\nshuffled metadata: change {rob['mean_abs_change']:.4g}"
        if "error_increase" in rob:
            title += f", error increase {rob['error_increase']:+.4g}"
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", color="0.9")
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def reference_images(real_uint8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, 3, h, w) → float [0, 1] (N, 3, H, W) at the sample size (area / bilinear resize)."""
    x = torch.from_numpy(np.asarray(real_uint8)).float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0).numpy()


# ---------------------------------------------------------------------------------------------- STAC
def write_stac(
    result: Evaluation, out_dir: str | Path, model_uri: str, model_version: str
) -> tuple[Path | None, int]:
    """The model's images as a validated STAC catalog (samples without lon/lat/gsd are left out).

    Returns (catalog.json or None when no sample can be georeferenced, number of items validated).
    """
    keep = [i for i, m in enumerate(result.metadata) if None not in (m.lon, m.lat, m.gsd)]
    if not keep:
        return None, 0
    kind = result.kind
    catalog = write_generated_stac(
        result.images[keep],
        [result.metadata[i] for i in keep],
        [result.prompts[i] for i in keep],
        [result.seeds[i] for i in keep],
        model_uri=model_uri,
        model_version=model_version,
        out_dir=out_dir,
        collection_id=f"dsat-{kind}",
        description=f"DiffusionSat {kind} outputs on held-out metadata",
    )
    count = validate_catalog(catalog)
    return catalog, count


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def headline_figures(kind: str, metrics: Mapping[str, float]) -> list[str]:
    """``name=value (n=…)`` for every figure of an evaluation (sample sizes beside each, FID with its
    interval), with a smoke-figure note when the sizes are below the benchmark's (`is_smoke_figure`)."""
    out = []
    for name in sorted(metrics):
        if name in SAMPLE_SIZE_KEYS or name.startswith(("fid_ci_", "fid_bootstrap", "kid_std")):
            continue
        text = f"{name}={metrics[name]:.4g}"
        if name == "fid" and "fid_ci_low" in metrics:
            text += f" [95% CI {metrics['fid_ci_low']:.4g}–{metrics['fid_ci_high']:.4g}]"
        if name == "kid_mean" and "kid_std" in metrics:
            text += f" ± {metrics['kid_std']:.2g}"
        size = metric_sample_size(name, metrics)
        out.append(f"{text} ({size})" if size else text)
    if is_smoke_figure(kind, metrics):
        bench = (
            f"{BENCH_MIN_GENERATION} generated and real"
            if kind == "generation"
            else f"{BENCH_MIN_SR_TILES} tiles from {BENCH_MIN_SR_SENSORS} sensors"
        )
        out.append(f"smoke figures (the benchmark takes >= {bench})")
    return out


def evaluation_markdown(
    result: Evaluation,
    *,
    model_uri: str,
    store_uri: str,
    content_hash: str,
    run_id: str | None = None,
    sensitivity_report: Mapping[str, Any] | None = None,
    stac_catalog: str | None = None,
) -> str:
    """A short markdown summary: metrics (model vs baseline side by side), skipped metrics, lineage."""
    lines = [
        f"# Evaluation: {result.kind}",
        "",
        f"- model: `{model_uri}`",
        f"- store: `{store_uri}` (content hash `{content_hash[:16]}`)",
        f"- {len(result.records)} samples from {result.n_eval_tiles} `{result.params.get('split')}` tiles "
        f"(holdout fraction {result.params.get('holdout_fraction')})",
    ]
    if run_id:
        lines.append(f"- MLflow run: `{run_id}`")
    if stac_catalog:
        lines.append(f"- STAC catalog: `{stac_catalog}`")
    lines.append("")
    if result.params.get("smoke_figure"):
        lines += ["Smoke figures: the sample sizes are below the benchmark's.", ""]
    if result.params.get("missing_bands") or result.params.get("unknown_bands"):
        lines += [
            f"Bands: the store has {result.params['cond_bands']}, the ControlNet takes "
            f"{result.params['model_bands']}; missing (learned missing value): "
            f"{result.params['missing_bands']}; unknown (dropped): {result.params['unknown_bands']}",
            "",
        ]
    if isinstance(result, PairedEval):
        names = sorted({k.split("/")[0] for k in result.metrics if k.endswith("/model")})
        lines += [f"| metric | model | {result.baseline} | n |", "|---|---|---|---|"]
        for name in names:
            model = result.metrics[f"{name}/model"]
            base = result.metrics[f"{name}/{result.baseline}"]
            size = metric_sample_size(f"{name}/model", result.metrics) or ""
            lines.append(f"| {name} | {_fmt(model)} | {_fmt(base)} | {size} |")
    else:
        lines += ["| metric | value | n |", "|---|---|---|"]
        lines += [
            f"| {k} | {_fmt(v)} | {metric_sample_size(k, result.metrics) or ''} |"
            for k, v in result.metrics.items()
        ]
    if result.skipped:
        lines += ["", "Skipped:"]
        lines += [f"- {k}: {v}" for k, v in result.skipped.items()]
    if sensitivity_report:
        lines += ["", "Metadata sensitivity (mean |change| of the image, same seed):", ""]
        lines += ["| field | change |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sensitivity_report.get("fields", {}).items()]
        for key, value in sensitivity_report.get("robustness", {}).items():
            lines.append(f"| shuffled metadata: {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


__all__ = [
    "SENSITIVITY_VALUES",
    "default_sensitivity_values",
    "evaluation_markdown",
    "evaluation_sensitivity",
    "generation_rows",
    "headline_figures",
    "make_sample_fn",
    "metadata_sensitivity",
    "plot_sensitivity",
    "reference_images",
    "sample_grid",
    "sensitivity_metrics",
    "write_json",
    "write_quality_map",
    "write_stac",
]
