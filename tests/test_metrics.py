"""Evaluation metrics, baselines and metadata sensitivity (dsat_core.evaluation)."""

from __future__ import annotations

import json
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dsat_core.evaluation import (
    PSNR_CAP_DB,
    ImageMetrics,
    InceptionFeatures,
    InceptionScoreUnavailable,
    kernel_inception_distance,
    paired_metrics,
    prepare_images,
    robustness,
    sensitivity,
    shuffled_metadata,
    vary_field,
)
from dsat_core.evaluation.lpips import LPIPS, LPIPSUnavailable, load_lpips
from dsat_core.evaluation.metrics import FrechetAccumulator, InceptionScoreAccumulator
from dsat_core.imaging import (
    bicubic_upsample,
    classical_inpaint,
    nearest_date_frame,
    rgb_band_indices,
    to_rgb,
)
from dsat_core.metadata import SatMetadata

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
N = 20  # images per set: small (Inception runs on 2 shared CPU cores, ~0.15-1.5 s per image)


def _smooth_images(seed: int, n: int, contrast: float) -> torch.Tensor:
    """Deterministic uint8 (n, 3, 64, 64) images: bicubic-upsampled 16x16 noise through a sigmoid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(x, size=64, mode="bicubic", align_corners=False)
    return (torch.sigmoid(contrast * x) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def two_sets(inception):
    """FID/KID of two different sets, streamed in uneven batches; also returns the features kept for KID."""
    a, b = _smooth_images(0, N, 1.0), _smooth_images(1, N, 3.0)
    m = ImageMetrics(["fid", "kid"], inception=inception, kid_subsets=20, kid_subset_size=12, seed=3)
    m.update(real=a[:13], fake=b[:7])
    m.update(fake=b[7:])
    m.update(real=a[13:])
    result = m.compute()
    feats_a = m.stored_features("real").astype(np.float64)
    feats_b = m.stored_features("fake").astype(np.float64)
    return a, b, result, feats_a, feats_b


def _reference_fid(fa: np.ndarray, fb: np.ndarray) -> float:
    """Independent FID: np.cov + scipy.linalg.sqrtm (pytorch-fid style).

    The covariances of n < 2048 samples live in the span of the centred features, so sqrtm is applied to the
    covariances expressed in an orthonormal basis of that span: exact, and 64x64 instead of 2048x2048.
    """
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    basis, _ = np.linalg.qr(np.concatenate([fa - mu_a, fb - mu_b]).T)
    s_a, s_b = np.cov(fa @ basis, rowvar=False), np.cov(fb @ basis, rowvar=False)
    with warnings.catch_warnings():  # s_a @ s_b is singular (each set spans only n - 1 of the 2n - 2 dims)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)
    trace_full = np.trace(np.cov(fa, rowvar=False)) + np.trace(np.cov(fb, rowvar=False))
    return float(((mu_a - mu_b) ** 2).sum() + trace_full - 2 * np.trace(covmean))


def test_inception_features_shape_and_batch_invariance(inception):
    imgs = _smooth_images(5, 2, 1.0)
    f_all = inception(imgs)
    f_one = torch.cat([inception(imgs[i : i + 1]) for i in range(2)])
    assert f_all.shape == (2, 2048) and f_all.dtype == torch.float32
    assert inception.num_features == 2048
    # batch composition does not change the features (kernels for other batch sizes may round differently;
    # a batch-dependent bug such as batch-norm statistics moves them by orders of magnitude more)
    torch.testing.assert_close(f_one, f_all, rtol=1e-4, atol=1e-4)
    # uint8 and the same images as float in [0, 1] give the same features
    assert torch.allclose(f_all, inception(imgs.float() / 255), atol=1e-5)


def test_fid_matches_independent_scipy_computation(two_sets):
    _, _, result, fa, fb = two_sets
    assert fa.shape == fb.shape == (N, 2048)
    reference = _reference_fid(fa, fb)
    assert reference > 1.0  # the sets really differ
    assert abs(result["fid"] - reference) / reference < 1e-3
    assert result["n_real"] == result["n_fake"] == N


def test_fid_on_second_pair_of_sets_matches_reference(two_sets):
    # a second, different pair: the first 12 images of each set against the last 8 of the other
    _, _, _, fa, fb = two_sets
    m = ImageMetrics(["fid"], inception=torch.nn.Identity())
    m.update_features(real=fa[:12], fake=fb[12:])
    m.update_features(real=fb[:12], fake=fa[12:])
    real, fake = np.concatenate([fa[:12], fb[:12]]), np.concatenate([fb[12:], fa[12:]])
    reference = _reference_fid(real, fake)
    assert abs(m.compute()["fid"] - reference) / reference < 1e-3


def test_streaming_accumulator_equals_batch_covariance():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(101, 7))
    acc = FrechetAccumulator(7)
    for chunk in np.array_split(x, [1, 2, 40, 41, 90]):
        acc.update(chunk)
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.covariance(), np.cov(x, rowvar=False), rtol=1e-10)


def test_identical_sets(inception, two_sets):
    a = two_sets[0][:6]
    m = ImageMetrics(["fid", "kid", "psnr", "ssim"], inception=inception, kid_subsets=5, kid_subset_size=6)
    m.update(real=a.float() / 255, fake=a.float() / 255)  # float [0, 1] path
    r = m.compute()
    # FID of identical sets: exact 0 up to float64 round-off of traces ~ 30
    assert abs(r["fid"]) < 1e-6
    assert r["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert r["psnr"] == PSNR_CAP_DB  # MSE 0 -> +inf, reported as the documented cap
    # Unbiased KID of a set against itself with the full set as subset is exactly
    # -2/(n-1) * (mean diagonal - mean of all) of the kernel matrix: O(1/n), not 0.
    f = m.stored_features("real").astype(np.float64)
    k = (f @ f.T / f.shape[1] + 1) ** 3
    expected = -2.0 / (len(f) - 1) * (np.diag(k).mean() - k.mean())
    assert r["kid_mean"] == pytest.approx(expected, rel=1e-9)


def test_kid_matches_torchmetrics_with_custom_extractor(inception, two_sets):
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b, _, fa, fb = two_sets
    kid = KernelInceptionDistance(feature=inception, subsets=3, subset_size=5)
    kid.update(a[:5], real=True)
    kid.update(b[:5], real=False)
    tm_mean, _ = kid.compute()
    # subset_size == n: every subset is the whole set, so the value does not depend on the random draws
    ours, std = kernel_inception_distance(fa[:5], fb[:5], subsets=3, subset_size=5)
    assert float(tm_mean) == pytest.approx(ours, rel=1e-4)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_seeded_and_deterministic(two_sets):
    _, _, result, fa, fb = two_sets
    again = kernel_inception_distance(fa, fb, subsets=20, subset_size=12, seed=3)
    assert again == (result["kid_mean"], result["kid_std"])
    other = kernel_inception_distance(fa, fb, subsets=20, subset_size=12, seed=4)
    assert other != again
    assert result["kid_mean"] > 0


def test_inception_score_requires_logits():
    with pytest.raises(InceptionScoreUnavailable, match="logits"):
        ImageMetrics(["is"])


def test_inception_score_with_logits_model():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    images = _smooth_images(2, 12, 2.0)
    m = ImageMetrics(["is"], logits_model=head, is_splits=3)
    m.update(fake=images[:5])
    m.update(fake=images[5:])
    r = m.compute()
    # independent: all probabilities at once, split i % 3
    from dsat_core.evaluation.inception import inception_preprocess

    with torch.no_grad():
        p = torch.softmax(head(inception_preprocess(images.float() / 255)).double(), -1).numpy()
    scores = []
    for s in range(3):
        ps = p[s::3]
        scores.append(np.exp((ps * (np.log(ps) - np.log(ps.mean(0)))).sum(1).mean()))
    assert r["is_mean"] == pytest.approx(np.mean(scores), rel=1e-9)
    assert r["is_std"] == pytest.approx(np.std(scores), rel=1e-6, abs=1e-12)
    # known values: K equally used one-hot classes -> K; a single class -> 1
    acc = InceptionScoreAccumulator(splits=1)
    acc.update_probs(np.eye(5))
    assert acc.compute()[0] == pytest.approx(5.0)
    acc = InceptionScoreAccumulator(splits=2)
    acc.update_probs(np.tile([[1.0, 0.0]], (6, 1)))
    assert acc.compute()[0] == pytest.approx(1.0)


def test_input_validation_and_ranges():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"fake: .*value_range"):
        prepare_images(x * 2 - 1, name="fake")
    with pytest.raises(TypeError, match="uint8"):
        prepare_images(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        prepare_images(torch.zeros(3, 4, 4))
    signed = prepare_images(x * 2 - 1, value_range=(-1.0, 1.0))
    assert torch.allclose(signed, x, atol=1e-6)
    as_uint8 = prepare_images((x * 255).round().to(torch.uint8).numpy())
    assert torch.allclose(as_uint8, x, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="unknown metrics"):
        ImageMetrics(["fid", "nope"])


def test_to_rgb_rule():
    assert rgb_band_indices(["b02", "b03", "b04", "b08"], 4) == [2, 1, 0]
    assert rgb_band_indices(["nir", "Red", "Green", "Blue"], 4) == [1, 2, 3]
    assert rgb_band_indices(["coastal", "nir", "swir16"], 3) == [0, 1, 2]  # no RGB names: first three
    assert rgb_band_indices(None, 1) == [0, 0, 0]
    with pytest.raises(ValueError, match="2 channels"):
        rgb_band_indices(["vv", "vh"], 2)
    with pytest.raises(ValueError, match="band names"):
        rgb_band_indices(["red"], 3)
    stack = np.arange(4 * 2 * 2).reshape(1, 4, 2, 2)
    rgb = to_rgb(stack, ["blue", "green", "red", "nir"])
    np.testing.assert_array_equal(rgb[0, 0], stack[0, 2])
    single = to_rgb(torch.ones(2, 1, 3, 3))
    assert single.shape == (2, 3, 3, 3)


def test_paired_metrics_known_values():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64) * 0.8
    pred = target + 0.1  # MSE 0.01 -> PSNR 20 dB exactly for data_range 1
    r = paired_metrics(pred, target, data_range=1.0)
    np.testing.assert_allclose(r.per_image["psnr"], 20.0, rtol=1e-9)
    tm_ssim = structural_similarity_index_measure(pred.double(), target.double(), data_range=1.0)
    assert r.mean["ssim"] == pytest.approx(float(tm_ssim), rel=1e-6)
    assert r.mean["psnr"] == pytest.approx(
        float(peak_signal_noise_ratio(pred, target, data_range=1.0)), rel=1e-5
    )
    same = paired_metrics(target, target, data_range=1.0)
    assert same.mean["psnr"] == PSNR_CAP_DB and same.mean["ssim"] == pytest.approx(1.0)
    # uint8 with data_range 255 and [-1, 1] with (-1, 1) describe the same images
    u8 = paired_metrics((pred * 255).round().to(torch.uint8), (target * 255).round().to(torch.uint8), 255)
    assert u8.mean["psnr"] == pytest.approx(20.0, abs=0.2)
    signed = paired_metrics(pred * 2 - 1, target * 2 - 1, data_range=(-1.0, 1.0))
    assert signed.mean["psnr"] == pytest.approx(r.mean["psnr"], rel=1e-9)
    assert signed.mean["ssim"] == pytest.approx(r.mean["ssim"], rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_metrics(pred[:2], target, 1.0)


def _lpips_package_layout(model: LPIPS) -> dict[str, torch.Tensor]:
    """Rename to the `lpips` package's state_dict keys (net.slice{k}.{i}.*, lin{k}.model.1.weight)."""
    bounds = [0, 2, 5, 8, 10, 12]
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("features."):
            idx = int(key.split(".")[1])
            k = next(s for s in range(5) if bounds[s] <= idx < bounds[s + 1]) + 1
            out[f"net.slice{k}.{key[len('features.') :]}"] = value.contiguous()
        else:
            out[f"lin{key.split('.')[1]}.model.1.weight"] = value.contiguous()
    return out


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_lpips_from_local_weights(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(LPIPSUnavailable, match="lpips_alex.safetensors"):
        load_lpips(tmp_path)
    with pytest.raises(LPIPSUnavailable, match="weights"):
        ImageMetrics(["lpips"])
    torch.manual_seed(0)
    ref = LPIPS("alex")
    for lin in ref.lins:  # LPIPS linear weights are non-negative
        lin.weight.data.abs_()
    save_file(_lpips_package_layout(ref), str(tmp_path / "lpips_alex.safetensors"))
    model = load_lpips(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    d_xy = model(x, y)
    assert torch.allclose(d_xy, ref(x, y))
    assert torch.all(d_xy > 0) and torch.allclose(model(x, x), torch.zeros(2))
    with torch.no_grad():
        torch.jit.trace(ref, (x, y)).save(str(tmp_path / "scripted.pt"))
    assert torch.allclose(load_lpips(tmp_path / "scripted.pt")(x, y), d_xy)
    r = paired_metrics((x + 1) / 2, (y + 1) / 2, data_range=1.0, lpips=tmp_path / "lpips_alex.safetensors")
    np.testing.assert_allclose(r.per_image["lpips"], d_xy.numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP + processor saved locally (test data: no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(d / "clip")
    processor.save_pretrained(d / "clip")
    return d / "clip"


def test_clip_score_from_local_folder(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from dsat_core.evaluation.clip import CLIPScorer, CLIPUnavailable

    with pytest.raises(CLIPUnavailable, match="config.json"):
        CLIPScorer(tmp_path)
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a field", "a river", "a city", "sand"]
    scores = CLIPScorer(tiny_clip)(images, prompts)
    # independent: the model's own forward gives logit_scale * cosine similarity
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    proc = CLIPProcessor.from_pretrained(str(tiny_clip))
    inputs = proc(text=prompts, images=[im.permute(1, 2, 0).numpy() for im in images], do_rescale=False,
                  return_tensors="pt", padding=True)  # fmt: skip
    with torch.no_grad():
        out = model(**inputs)
    cos = out.logits_per_image.diag() / model.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-4)
    m = ImageMetrics(["clip"], clip=tiny_clip)
    m.update(fake=images[:2], prompts=prompts[:2])
    m.update(fake=images[2:], prompts=prompts[2:])
    assert m.compute()["clip_score"] == pytest.approx(float(scores.double().mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------ baselines
def test_bicubic_upsample():
    low = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    up = bicubic_upsample(low, 32)
    assert up.shape == (2, 3, 32, 32) and up.dtype == np.uint8
    flat = bicubic_upsample(torch.full((3, 4, 4), 0.25), (8, 12))
    assert flat.shape == (3, 8, 12) and torch.allclose(flat, torch.tensor(0.25))
    # x4 bicubic of a 4x area-downsampled smooth image is close to the original (pixel centres aligned)
    xs = torch.linspace(0, 1, 32, dtype=torch.float64)
    smooth = (torch.sin(3 * xs)[:, None] * torch.cos(2 * xs)[None, :]).expand(1, 1, 32, 32)
    rec = bicubic_upsample(torch.nn.functional.avg_pool2d(smooth, 4), 32)
    nearest = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(smooth, 4), size=32)
    assert (rec - smooth).abs().mean() < 0.02
    assert (rec - smooth).abs().mean() < 0.5 * (nearest - smooth).abs().mean()


def test_nearest_date_frame():
    frames = np.arange(3)[:, None, None, None] * np.ones((3, 1, 2, 2))
    dates = ["2020-01-01", date(2020, 3, 1), "2020-06-01T10:00:00Z"]
    assert nearest_date_frame(frames, dates, "2020-02-15")[0, 0, 0] == 1
    assert nearest_date_frame(frames, dates, date(2021, 1, 1))[0, 0, 0] == 2
    # tie (equal gaps) goes to the earlier frame
    assert nearest_date_frame(frames[:2], ["2020-01-01", "2020-01-03"], "2020-01-02")[0, 0, 0] == 0
    with pytest.raises(ValueError, match="3 frames but 2 dates"):
        nearest_date_frame(frames, dates[:2], "2020-01-01")


def test_classical_inpaint_reproduces_harmonic_image():
    yy, xx = np.mgrid[0:24, 0:32].astype(np.float64)
    ramp = np.stack(
        [3 * xx + 10, 2 * xx + 50, 200 - 4 * xx]
    )  # linear in x: harmonic, Neumann-compatible in y
    mask = np.zeros((24, 32), bool)
    mask[5:15, 8:20] = True
    damaged = ramp.copy()
    damaged[:, mask] = 0
    filled = classical_inpaint(damaged, mask)
    np.testing.assert_allclose(filled, ramp, atol=1e-8)
    as_u8 = classical_inpaint(
        torch.from_numpy(damaged.astype(np.uint8))[None], torch.from_numpy(mask)[None, None]
    )
    assert as_u8.dtype == torch.uint8 and as_u8.shape == (1, 3, 24, 32)
    assert torch.equal(
        as_u8[0][:, ~torch.from_numpy(mask)], torch.from_numpy(ramp.astype(np.uint8))[:, ~mask]
    )
    assert np.abs(as_u8[0].numpy().astype(float) - ramp).max() <= 1.0
    with pytest.raises(ValueError, match="entirely masked"):
        classical_inpaint(damaged, np.ones((24, 32), bool))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real imagery not found at {REAL}")
def test_real_temporal_pair_metrics():
    """Two real Sentinel-2 dates on the same Havelland grid: nearest-date baseline vs the later date."""
    import rasterio

    def read(name: str) -> np.ndarray:
        with rasterio.open(REAL / name) as src:
            return src.read(window=((0, 256), (0, 256))).astype(np.float64)

    may29 = read("sentinel2_l1c_T33UUU_20160529_b03_10m.tif")
    jun08 = read("sentinel2_l1c_T33UUU_20160608_b03_10m.tif")
    hi = float(np.percentile(np.concatenate([may29, jun08]), 99.5))
    frames = np.clip(np.stack([may29, jun08]) / hi, 0, 1)
    baseline = nearest_date_frame(frames[:1], ["2016-05-29"], "2016-06-08")
    r = paired_metrics(to_rgb(baseline[None]), to_rgb(frames[1][None]), data_range=1.0)
    assert 10.0 < r.mean["psnr"] < PSNR_CAP_DB and 0.0 < r.mean["ssim"] < 1.0
    # the same scene 10 days apart is far more alike than the scene against a shifted copy of itself
    shifted = paired_metrics(frames[1][None, :, :, 40:], frames[1][None, :, :, :-40], data_range=1.0)
    assert r.mean["ssim"] > shifted.mean["ssim"]


# ---------------------------------------------------------------------------------------- sensitivity
def _fake_sampler(metadata: list[SatMetadata], seed: int) -> np.ndarray:
    """Deterministic test sampler: a pure function of (metadata, seed); ignores lon, uses lat and month."""
    noise = np.random.default_rng(seed).random((1, 3, 8, 8))
    rows = [noise[0] + 0.01 * (m.lat or 0.0) + 0.1 * (m.month or 0) for m in metadata]
    return np.stack(rows)


def test_vary_field_and_sensitivity():
    base = SatMetadata(lon=10.0, lat=20.0, gsd=1.0, year=2020, month=6, day=1)
    varied = vary_field(base, "month", [1, 12, None])
    assert [m.month for m in varied] == [1, 12, None] and all(m.lat == 20.0 for m in varied)
    with pytest.raises(ValueError, match="unknown metadata field"):
        vary_field(base, "colour", [1])
    with pytest.raises(ValueError, match="month"):
        vary_field(base, "month", [13])
    report = sensitivity(
        _fake_sampler, base, {"lon": [-50.0, 100.0], "lat": [0.0, 40.0], "month": [1, 12]}, 7
    )
    assert report["lon"] == 0.0  # ignored field
    assert report["lat"] == pytest.approx(0.01 * 20.0)  # |0 - 20| and |40 - 20| -> mean 20 * 0.01
    assert report["month"] == pytest.approx(0.1 * (5 + 6) / 2)


def test_robustness_with_wrong_metadata():
    correct = [SatMetadata(lat=float(lat), month=m) for lat, m in [(10, 1), (20, 2), (30, 3)]]
    wrong = shuffled_metadata(correct, seed=0)
    assert all(w != c for w, c in zip(wrong, correct, strict=True))
    assert sorted(w.lat for w in wrong) == [10.0, 20.0, 30.0]
    reference = _fake_sampler(correct, 5)
    r = robustness(_fake_sampler, correct, wrong, seed=5, reference=reference)
    assert r["error_correct"] == 0.0 and r["error_wrong"] > 0 and r["error_increase"] == r["error_wrong"]
    assert r["mean_abs_change"] > 0
    same = robustness(_fake_sampler, correct, correct, seed=5)
    assert same["mean_abs_change"] == 0.0


def test_all_missing_change_and_score_ratios():
    from dsat_core.evaluation.sensitivity import all_missing_change, score_ratios

    metadata = [SatMetadata(lat=10.0, month=2), SatMetadata(lon=5.0)]
    # _fake_sampler adds 0.01 * lat + 0.1 * month: all missing removes 0.3 from the first, 0 from the second
    assert all_missing_change(_fake_sampler, metadata, seed=3) == pytest.approx((0.3 + 0.0) / 2)
    assert all_missing_change(_fake_sampler, [SatMetadata()], seed=3) == 0.0
    ratios = score_ratios(
        {"lat": 0.2, "lon": 0.5, "month": 0.0, "gsd": 1.0}, {"lat": 0.1, "lon": 0.0, "month": 0.0}
    )
    assert list(ratios) == ["lat", "lon", "month"]  # keys of both, numerator's order
    assert ratios["lat"] == pytest.approx(2.0) and ratios["lon"] == float("inf") and np.isnan(ratios["month"])


# ------------------------------------------------------------------------------- honest evaluation (#16)
def _feature_sets(n: int, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(0.3, 1.2, size=(n, dim))


def test_fid_from_features_equals_the_covariance_formula() -> None:
    from dsat_core.evaluation.metrics import frechet_distance, frechet_distance_features

    rng = np.random.default_rng(3)
    for n, m, dim in ((40, 30, 64), (200, 150, 8)):  # fewer images than dimensions (Gram form), and more
        x, y = rng.normal(size=(n, dim)), rng.normal(0.2, 1.1, size=(m, dim))
        want = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        assert frechet_distance_features(x, y) == pytest.approx(want, rel=1e-7)
    assert abs(frechet_distance_features(x, x)) < 1e-8
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_features(x[:1], y)


def test_fid_bootstrap_interval_holds_the_estimate_and_narrows_with_n() -> None:
    from dsat_core.evaluation.metrics import fid_bootstrap, frechet_distance_features

    widths = []
    for n in (40, 640):
        real, fake = _feature_sets(n, seed=n)
        interval = fid_bootstrap(real, fake, resamples=200, seed=1)
        assert interval.estimate == pytest.approx(frechet_distance_features(real, fake))
        assert interval.low < interval.estimate < interval.high
        assert interval.bias > 0  # resampling repeats images: FID's small-sample bias, corrected for
        assert interval.level == 0.95 and interval.resamples == 200
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 16x the images, about a quarter of the width
    again = fid_bootstrap(*_feature_sets(40, seed=40), resamples=200, seed=1)
    assert again.low == pytest.approx(fid_bootstrap(*_feature_sets(40, seed=40), seed=1).low)  # seeded
    with pytest.raises(ValueError, match="level"):
        fid_bootstrap(real, fake, level=1.5)


def test_kid_std_is_positive_and_shrinks_with_n() -> None:
    from dsat_core.evaluation.metrics import kid_subset_size

    assert kid_subset_size(16, 30) == 8 and kid_subset_size(5000, 4000) == 1000 and kid_subset_size(3, 3) == 2
    stds = []
    for n in (40, 320):
        real, fake = _feature_sets(n, seed=7 + n)
        mean, std = kernel_inception_distance(real, fake, subsets=50, subset_size=kid_subset_size(n, n))
        assert mean > 0 and std > 0
        stds.append(std)
        # subsets as large as the sets are always the whole sets: std 0, which is why the size is half
        assert kernel_inception_distance(real, fake, subsets=5, subset_size=n)[1] == pytest.approx(
            0, abs=1e-12
        )
    assert stds[1] < stds[0] / 2


def test_lr_consistency_of_bicubic_is_high_and_of_noise_low() -> None:
    from dsat_core.data.tasks import DegradationRecipe
    from dsat_core.evaluation.metrics import lr_consistency_psnr

    recipe = DegradationRecipe(factor=4, blur_sigma=1.0)
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=64, mode="bilinear")
    low = torch.stack([recipe.lowres(x) for x in smooth])  # (2, 3, 16, 16): the SR input
    upsampled = bicubic_upsample(low.double(), 64).clamp(0, 1)
    again = torch.stack([recipe.lowres(x) for x in upsampled]).double()
    consistent = lr_consistency_psnr(again, low.double())
    noise = torch.stack([recipe.lowres(x) for x in torch.rand(2, 3, 64, 64, generator=g)]).double()
    assert consistent.min() > 35 and lr_consistency_psnr(noise, low.double()).max() < 20
    with pytest.raises(ValueError, match="LR-consistency"):
        lr_consistency_psnr(again[:, :, :8], low.double())


def test_sample_sizes_and_smoke_figures() -> None:
    from dsat_core.evaluation.metrics import is_smoke_figure, metric_sample_size

    generation = {
        "fid": 3.0,
        "fid_ci_low": 2.0,
        "kid_mean": 0.1,
        "is_mean": 2.0,
        "n_fake": 16.0,
        "n_real": 12.0,
    }
    assert metric_sample_size("fid", generation) == "n=16 generated / 12 real"
    assert metric_sample_size("fid_ci_low", generation) == "n=16 generated / 12 real"
    assert (
        metric_sample_size("is_mean", generation) == "n=16"
        and metric_sample_size("n_fake", generation) is None
    )
    paired = {"psnr/model": 20.0, "lr_psnr/bicubic": 30.0, "n_tiles": 64.0, "n_sensors": 2.0}
    assert metric_sample_size("lr_psnr/bicubic", paired) == "n=64 tiles, 2 sensors"
    assert is_smoke_figure("generation", generation)
    assert not is_smoke_figure("generation", {**generation, "n_fake": 256.0, "n_real": 300.0})
    assert not is_smoke_figure("sr", paired)
    assert is_smoke_figure("sr", {**paired, "n_sensors": 1.0}) and is_smoke_figure(
        "sr", {**paired, "n_tiles": 63.0}
    )
