"""Evaluation: image metrics (FID, KID, IS, PSNR, SSIM, LPIPS, CLIP), quality maps, STAC output, metadata
sensitivity. Pure library code: flows call these functions and log the results. (The RGB views and the
classical baselines it scores are in `dsat_core.imaging`, the tasks in `dsat_core.data.tasks`.)

Names are imported on first use (the STAC output needs rasterio / pyproj / pystac, the metrics torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.evaluation.geo_map import plot_quality_map, quality_map
    from dsat_core.evaluation.inception import InceptionFeatures, InceptionScoreUnavailable, load_logits_model
    from dsat_core.evaluation.metrics import (
        METRICS,
        PSNR_CAP_DB,
        ImageMetrics,
        PairedMetrics,
        frechet_distance,
        kernel_inception_distance,
        paired_metrics,
        prepare_images,
    )
    from dsat_core.evaluation.sensitivity import robustness, sensitivity, shuffled_metadata, vary_field
    from dsat_core.evaluation.stac_output import validate_catalog, write_generated_stac

_MODULE_OF = {
    "ImageMetrics": "metrics",
    "InceptionFeatures": "inception",
    "InceptionScoreUnavailable": "inception",
    "METRICS": "metrics",
    "PSNR_CAP_DB": "metrics",
    "PairedMetrics": "metrics",
    "frechet_distance": "metrics",
    "kernel_inception_distance": "metrics",
    "load_logits_model": "inception",
    "paired_metrics": "metrics",
    "plot_quality_map": "geo_map",
    "prepare_images": "metrics",
    "quality_map": "geo_map",
    "robustness": "sensitivity",
    "sensitivity": "sensitivity",
    "shuffled_metadata": "sensitivity",
    "validate_catalog": "stac_output",
    "vary_field": "sensitivity",
    "write_generated_stac": "stac_output",
}

__all__ = [
    "METRICS",
    "PSNR_CAP_DB",
    "ImageMetrics",
    "InceptionFeatures",
    "InceptionScoreUnavailable",
    "PairedMetrics",
    "frechet_distance",
    "kernel_inception_distance",
    "load_logits_model",
    "paired_metrics",
    "plot_quality_map",
    "prepare_images",
    "quality_map",
    "robustness",
    "sensitivity",
    "shuffled_metadata",
    "validate_catalog",
    "vary_field",
    "write_generated_stac",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
