"""Metadata sensitivity and robustness (spec §1 and §5: does changing lat/lon/month change the output?).

`sample_fn(metadata_list, seed) -> images` is any deterministic sampler (e.g. a pipeline call with a fixed
generator seed) returning an array (N, C, H, W) aligned with the metadata list. Images are compared as float
in whatever units the sampler returns (e.g. [0, 1]); the report states the mean absolute pixel change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dsat_core.metadata import FIELD_NAMES, SatMetadata

SampleFn = Callable[[list[SatMetadata], int], np.ndarray]


def vary_field(base: SatMetadata, field: str, values: Iterable[Any]) -> list[SatMetadata]:
    """Copies of `base` with `field` set to each of `values` (None = missing); invalid values raise."""
    if field not in FIELD_NAMES:
        raise ValueError(f"unknown metadata field {field!r}; fields are {FIELD_NAMES}")
    return [base.replace(**{field: value}) for value in values]


def _sample(sample_fn: SampleFn, metadata: list[SatMetadata], seed: int) -> np.ndarray:
    images = np.asarray(sample_fn(metadata, seed), dtype=np.float64)
    if images.ndim != 4 or images.shape[0] != len(metadata):
        raise ValueError(
            f"sample_fn returned shape {images.shape} for {len(metadata)} metadata; expected (N, C, H, W)"
        )
    return images


def sensitivity(
    sample_fn: SampleFn,
    base_metadata: SatMetadata,
    fields_and_values: Mapping[str, Sequence[Any]],
    seed: int,
) -> dict[str, float]:
    """Mean absolute pixel change vs the base sample when one field at a time takes other values.

    Same seed for every call, so the only difference is the metadata. Per field: the mean over its values
    of mean |sample(varied) - sample(base)|. A field the model ignores scores 0.
    """
    base = _sample(sample_fn, [base_metadata], seed)[0]
    report: dict[str, float] = {}
    for field, values in fields_and_values.items():
        varied = vary_field(base_metadata, field, values)
        if not varied:
            raise ValueError(f"sensitivity: no values given for field {field!r}")
        images = _sample(sample_fn, varied, seed)
        report[field] = float(np.abs(images - base[None]).mean())
    return report


def sensitivity_details(
    sample_fn: SampleFn,
    base_metadata: SatMetadata,
    fields_and_values: Mapping[str, Sequence[Any]],
    seed: int,
) -> dict[str, list[tuple[Any, float]]]:
    """Like `sensitivity` but per value: {field: [(value, mean abs change), ...]} (for report tables)."""
    base = _sample(sample_fn, [base_metadata], seed)[0]
    out: dict[str, list[tuple[Any, float]]] = {}
    for field, values in fields_and_values.items():
        values = list(values)
        images = _sample(sample_fn, vary_field(base_metadata, field, values), seed)
        out[field] = [(v, float(np.abs(img - base).mean())) for v, img in zip(values, images, strict=True)]
    return out


def robustness(
    sample_fn: SampleFn,
    correct: Sequence[SatMetadata],
    wrong: Sequence[SatMetadata],
    seed: int,
    reference: np.ndarray | None = None,
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Samples with correct vs wrong metadata (same seed, same order).

    Always reports `mean_abs_change` (wrong vs correct samples). With `reference` images (N, C, H, W) aligned
    with `correct`, also `error_correct` / `error_wrong`: the mean of `metric(samples, reference)` (default
    per-image mean absolute error) and `error_increase` = wrong - correct (positive: the metadata helps).
    """
    if len(correct) != len(wrong):
        raise ValueError(f"{len(correct)} correct but {len(wrong)} wrong metadata")
    good = _sample(sample_fn, list(correct), seed)
    bad = _sample(sample_fn, list(wrong), seed)
    out = {"mean_abs_change": float(np.abs(bad - good).mean())}
    if reference is not None:
        reference = np.asarray(reference, np.float64)
        if reference.shape != good.shape:
            raise ValueError(f"reference shape {reference.shape} != sample shape {good.shape}")
        score = metric or (lambda a, b: np.abs(a - b).reshape(a.shape[0], -1).mean(axis=1))
        out["error_correct"] = float(np.mean(score(good, reference)))
        out["error_wrong"] = float(np.mean(score(bad, reference)))
        out["error_increase"] = out["error_wrong"] - out["error_correct"]
    return out


def shuffled_metadata(metadata: Sequence[SatMetadata], seed: int = 0) -> list[SatMetadata]:
    """A "wrong metadata" control: the same metadata, deranged (no item keeps its own; needs >= 2 items)."""
    n = len(metadata)
    if n < 2:
        raise ValueError("shuffled_metadata needs at least 2 items")
    cycle = np.random.default_rng(seed).permutation(n)
    order = np.empty(n, dtype=int)
    order[cycle] = np.roll(
        cycle, 1
    )  # item cycle[k] gets the metadata of cycle[k-1]: one cycle, no fixed point
    return [metadata[int(i)] for i in order]


def all_missing_change(sample_fn: SampleFn, metadata: Sequence[SatMetadata], seed: int) -> float:
    """Mean absolute pixel change when every field of every entry is marked missing (same seed)."""
    return robustness(sample_fn, metadata, [SatMetadata()] * len(metadata), seed)["mean_abs_change"]


def score_ratios(numerator: Mapping[str, float], denominator: Mapping[str, float]) -> dict[str, float]:
    """`numerator[k] / denominator[k]` for each key of both, in `numerator`'s order (to compare two models).

    A zero denominator gives inf (signed like the numerator), or nan when the numerator is 0 too.
    """
    out: dict[str, float] = {}
    for key, a in numerator.items():
        if key not in denominator:
            continue
        b = float(denominator[key])
        out[key] = float(a) / b if b != 0 else (math.copysign(math.inf, a) if a != 0 else math.nan)
    return out
