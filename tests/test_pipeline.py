"""DiffusionSatPipeline on tiny components (CPU, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from dsat_core.metadata import SatMetadata
from dsat_core.models import load_text_encoder
from dsat_core.pipelines import DiffusionSatPipeline, make_tiny_pipeline

MD = SatMetadata(lon=-122.4, lat=37.8, gsd=0.5, cloud_cover=0.05, year=2019, month=6, day=2)
STEPS = 3


def _randomize_metadata_path(pipe: DiffusionSatPipeline, seed: int = 0) -> None:
    """A fresh metadata path outputs zero; give it weights so metadata changes samples."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.metadata_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture
def pipe() -> DiffusionSatPipeline:
    pipe = make_tiny_pipeline(sample_size=8)
    _randomize_metadata_path(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe: DiffusionSatPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {"prompt": "a satellite image of a farm", "metadata": MD, "num_inference_steps": STEPS, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_output_types_and_metadata(pipe) -> None:
    partial = SatMetadata(gsd=1.0, year=2020)
    out = pipe(
        ["a farm", "a port"],
        [MD, partial],
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (4, 16, 16, 3)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.metadata == [MD, MD, partial, partial]
    pt = pipe("x", num_inference_steps=2, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 16, 16)
    pil = pipe("x", num_inference_steps=2, height=32, width=24).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (24, 32)
    latents = pipe("x", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    none = pipe("x", metadata=None, num_inference_steps=2, output_type="latent")
    assert none.metadata == [SatMetadata()]


def test_same_seed_same_images(pipe) -> None:
    a, b = _run(pipe, seed=1), _run(pipe, seed=1)
    assert np.array_equal(a, b)
    assert not np.allclose(a, _run(pipe, seed=2))


def test_metadata_changes_samples(pipe) -> None:
    base = _run(pipe)
    assert not np.allclose(base, _run(pipe, metadata=MD.replace(lat=-10.0)))
    assert not np.allclose(base, _run(pipe, metadata=MD.replace(month=None)))


def test_save_load_same_samples(pipe, tmp_path) -> None:
    expected = _run(pipe, metadata_guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["dsat_core.models.sat_unet", "SatUNet"]
    assert index["text_encoder"] == ["dsat_core.models.text_encoders", "HashTextEncoder"]
    loaded = DiffusionSatPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    # two instances (the loaded weights are views into the safetensors files): kernels may round differently
    np.testing.assert_allclose(_run(loaded, metadata_guidance_scale=2.0), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        loaded.unet.conv_out.bias += 1e-2  # one wrong weight moves the [0, 1] images by ~2e-3 (200x)
    assert np.abs(_run(loaded, metadata_guidance_scale=2.0) - expected).max() > 1e-3


def test_save_load_with_minilm(tmp_path) -> None:
    pipe = make_tiny_pipeline(text_encoder=load_text_encoder("minilm", cross_attention_dim=32))
    pipe.set_progress_bar_config(disable=True)
    expected = _run(pipe, num_inference_steps=2)
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "text_encoder" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 100_000  # only the projection, not MiniLM's 90 MB
    loaded = DiffusionSatPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded, num_inference_steps=2), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_schedulers_run(pipe, name) -> None:
    pipe.set_scheduler(name)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    images = _run(pipe, num_inference_steps=4)
    assert np.isfinite(images).all() and images.std() > 0


def test_ddim_and_dpm_differ_and_bad_name(pipe) -> None:
    ddim = _run(pipe.set_scheduler("ddim"))
    dpm = _run(pipe.set_scheduler("dpm++"))
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert not np.allclose(ddim, dpm)
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe.set_scheduler("euler-magic")


def test_metadata_guidance(pipe) -> None:
    base = _run(pipe, guidance_scale=3.0)
    assert np.array_equal(base, _run(pipe, guidance_scale=3.0, metadata_guidance_scale=1.0))
    assert not np.allclose(base, _run(pipe, guidance_scale=3.0, metadata_guidance_scale=3.0))
    # scale 0 with no text guidance = sampling without metadata
    no_meta = _run(pipe, metadata=SatMetadata(), guidance_scale=1.0)
    np.testing.assert_allclose(
        _run(pipe, guidance_scale=1.0, metadata_guidance_scale=0.0), no_meta, atol=1e-5
    )
    # with all metadata missing the metadata branch equals the conditional one: guidance has no effect
    np.testing.assert_allclose(
        _run(pipe, metadata=SatMetadata(), metadata_guidance_scale=4.0),
        _run(pipe, metadata=SatMetadata()),
        atol=1e-5,
    )


def test_guidance_branches_batched_in_one_unet_call(pipe) -> None:
    batches: list[int] = []
    pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    _run(pipe, num_images_per_prompt=2, guidance_scale=5.0, metadata_guidance_scale=2.0)
    assert batches == [6] * STEPS  # 3 branches x 2 images, one call per step
    batches.clear()
    _run(pipe, guidance_scale=1.0)
    assert batches == [1] * STEPS


def test_text_guidance_uses_negative_prompt(pipe) -> None:
    base = _run(pipe, guidance_scale=5.0)
    assert not np.allclose(base, _run(pipe, guidance_scale=5.0, negative_prompt="clouds"))
    assert not np.allclose(base, _run(pipe, guidance_scale=1.0))


def test_input_errors(pipe) -> None:
    with pytest.raises(ValueError, match="cannot be paired"):
        pipe(["a", "b"], [MD, MD, MD], num_inference_steps=1)
    with pytest.raises(TypeError, match="SatMetadata"):
        pipe("a", metadata={"lat": 1.0}, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples"):
        pipe("a", height=15, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", output_type="jpeg", num_inference_steps=1)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], num_inference_steps=1)


def test_pipeline_checks_components() -> None:
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DiffusionSatPipeline(
            unet=pipe.unet, vae=pipe.vae, text_encoder=load_text_encoder("hash", 48), scheduler=pipe.scheduler
        )
