"""Band-aware ControlNets: conditioning channels by name, a learned value for a band the input lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dsat_core.metadata.bands import align_bands, canonical_band
from dsat_core.models import HashTextEncoder, SatUNet, make_tiny_vae, scheduler_config, unet_config
from dsat_core.models.controlnet3d import ControlNet3D, freeze
from dsat_core.pipelines import SatControlNetPipeline

SIX = ["blue", "green", "red", "nir", "swir16", "swir22"]
FOUR = ["B02", "B03", "B04", "B08"]  # Sentinel-2 ids of blue, green, red, nir
TOL = 1e-5


def test_canonical_band_names() -> None:
    assert [canonical_band(b) for b in FOUR] == SIX[:4]
    assert canonical_band("B8A") == canonical_band("b8a") == "nir08"
    assert canonical_band("SWIR1") == "swir16" and canonical_band("Coastal") == "coastal"
    assert canonical_band("my_band") == "my_band"
    alignment = align_bands(SIX, ["red", "B02", "thermal"])
    assert alignment.source == (1, None, 0, None, None, None) and alignment.unknown == ("thermal",)
    assert alignment.missing == ("green", "nir", "swir16", "swir22")
    with pytest.raises(ValueError, match="more than once"):
        align_bands(SIX, ["blue", "B02"])


@pytest.fixture(scope="module")
def controlnet() -> ControlNet3D:
    torch.manual_seed(0)
    unet = freeze(SatUNet(**unet_config("tiny", sample_size=8)))
    model = ControlNet3D.from_unet(unet, 6, (8, 16), vae_scale_factor=2, conditioning_bands=SIX)
    with torch.no_grad():  # a "trained" model: non-zero outputs and missing values
        for name, p in model.named_parameters():
            if "controlnet_" in name or "cond_embedding.conv_out" in name or name == "missing_band_values":
                p.normal_(0, 0.3)
    return model.eval()


def _inputs(channels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
        "cond": torch.rand(2, channels, 1, 16, 16, generator=g) * 2 - 1,
    }


def test_a_four_band_input_is_aligned_and_its_missing_bands_filled(controlnet: ControlNet3D) -> None:
    inputs = _inputs(4)
    aligned, present = controlnet.align_bands(inputs["cond"], FOUR)
    assert aligned.shape == (2, 6, 1, 16, 16)
    assert present.tolist() == [True, True, True, True, False, False]
    assert torch.equal(aligned[:, :4], inputs["cond"])  # copies, in the model's band order
    with torch.no_grad():
        down, mid = controlnet(**{**inputs, "cond": aligned}, cond_band_mask=present)
        filled = aligned.clone()
        filled[:, 4:] = controlnet.missing_band_values[4:, None, None, None]  # the learned missing value
        down_ref, mid_ref = controlnet(**{**inputs, "cond": filled})
        garbage = aligned.clone()
        garbage[:, 4:] = 7.0  # what the input holds in a missing band does not matter
        down_garbage, _ = controlnet(**{**inputs, "cond": garbage}, cond_band_mask=present)
        down_zeros, _ = controlnet(**{**inputs, "cond": aligned})  # zeros instead of the learned value
    for got, want, junk in zip(down, down_ref, down_garbage, strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        torch.testing.assert_close(junk, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(mid, mid_ref, atol=TOL, rtol=TOL)
    assert max((a - b).abs().max() for a, b in zip(down, down_zeros, strict=True)) > 1e-3


def test_unknown_bands_are_dropped_with_a_warning_and_missing_values_learn(controlnet: ControlNet3D) -> None:
    inputs = _inputs(5)
    with pytest.warns(UserWarning, match=r"\['thermal'\] are unknown"):
        aligned, present = controlnet.align_bands(inputs["cond"], [*FOUR, "thermal"])
    assert present.sum() == 4
    controlnet.zero_grad()
    down, mid = controlnet(**{**inputs, "cond": aligned}, cond_band_mask=present)
    (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
    grad = controlnet.missing_band_values.grad
    assert grad is not None and grad[4:].abs().min() > 0 and not grad[:4].any()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the bands"):
        controlnet.align_bands(inputs["cond"][:, :1], ["thermal"])


def test_band_names_round_trip_and_old_models_say_why(controlnet: ControlNet3D, tmp_path: Path) -> None:
    controlnet.save_pretrained(tmp_path / "cn")
    loaded = ControlNet3D.from_pretrained(tmp_path / "cn")
    assert loaded.config.conditioning_bands == SIX
    torch.testing.assert_close(loaded.missing_band_values, controlnet.missing_band_values)
    plain = ControlNet3D.from_unet(
        SatUNet(**unet_config("tiny", sample_size=8)), 6, (8, 16), vae_scale_factor=2
    )
    assert plain.missing_band_values is None and "missing_band_values" not in plain.state_dict()
    with pytest.raises(ValueError, match="without band names"):
        plain.align_bands(torch.zeros(1, 4, 1, 16, 16), FOUR)
    with pytest.raises(ValueError, match="name each of the 6"):
        ControlNet3D.from_unet(
            SatUNet(**unet_config("tiny", sample_size=8)), 6, (8, 16), conditioning_bands=SIX[:4]
        )


def test_pipeline_takes_a_store_with_fewer_bands(controlnet: ControlNet3D) -> None:
    unet = freeze(SatUNet(**unet_config("tiny", sample_size=8)))
    pipe = SatControlNetPipeline(
        unet=unet,
        controlnet=controlnet,
        vae=make_tiny_vae(2).eval(),
        text_encoder=HashTextEncoder(hidden_size=32),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
    cond = _inputs(4)["cond"]
    out = pipe(cond=cond, cond_bands=FOUR, num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="takes 6"):
        pipe(cond=cond, num_inference_steps=1, output_type="np")  # without names: the old clear error
