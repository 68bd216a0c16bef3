"""Evaluation: image metrics (FID, KID, IS, PSNR, SSIM, LPIPS, CLIP), baselines, quality maps, STAC output,
metadata sensitivity. Pure library code: flows call these functions and log the results."""

from dsat_core.evaluation.geo_map import plot_quality_map, quality_map
from dsat_core.evaluation.image_ops import (
    bicubic_upsample,
    classical_inpaint,
    nearest_date_frame,
    nearest_date_index,
    rgb_band_indices,
    to_rgb,
)
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

__all__ = [
    "METRICS",
    "PSNR_CAP_DB",
    "ImageMetrics",
    "InceptionFeatures",
    "InceptionScoreUnavailable",
    "PairedMetrics",
    "bicubic_upsample",
    "classical_inpaint",
    "frechet_distance",
    "kernel_inception_distance",
    "load_logits_model",
    "nearest_date_frame",
    "nearest_date_index",
    "paired_metrics",
    "plot_quality_map",
    "prepare_images",
    "quality_map",
    "rgb_band_indices",
    "robustness",
    "sensitivity",
    "shuffled_metadata",
    "to_rgb",
    "validate_catalog",
    "vary_field",
    "write_generated_stac",
]
