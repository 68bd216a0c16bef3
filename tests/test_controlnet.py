"""ControlNet3D + SatControlNetPipeline: shapes, no-op at init, frozen base, gates, save/load, inpainting,
image-to-image start (init_image + strength)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from dsat_core.metadata import SatMetadata
from dsat_core.models import HashTextEncoder, SatUNet, make_tiny_vae, scheduler_config, unet_config
from dsat_core.models.controlnet3d import (
    ControlNet3D,
    controlled_unet_forward,
    default_temporal_layers,
    freeze,
    residual_layout,
)
from dsat_core.models.vae import decode_latents, encode_latents
from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline, inpainting_condition

LATENT = 8  # latent side; the tiny VAE downsamples by 2 → 16 px frames
FACTOR = 2
ROUND_TRIP_TOL = 1e-4  # saved vs loaded instance: outputs were seen to differ in the 5th decimal
IMAGE_TOL = 1e-5  # the same for [0, 1] images (an 8-bit level is 4e-3)


@pytest.fixture(scope="module")
def unet() -> SatUNet:
    torch.manual_seed(0)
    model = SatUNet(**unet_config("tiny", sample_size=LATENT))
    for p in model.metadata_embedding.parameters():  # a "trained" metadata path, so it matters in the tests
        torch.nn.init.normal_(p, std=0.05)
    return freeze(model)


def _controlnet(unet: SatUNet, channels: int, **kwargs) -> ControlNet3D:
    torch.manual_seed(1)
    return ControlNet3D.from_unet(unet, channels, (8, 16), vae_scale_factor=FACTOR, **kwargs)


def _randomise(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give every zero-initialised output layer non-zero weights (a 'trained' ControlNet)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "controlnet_" in name or "cond_embedding.conv_out" in name:
                p.normal_(0, std)
            if "temporal_gates" in name:
                p.fill_(0.5)


def _inputs(batch: int, channels: int, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "metadata": torch.rand(batch, 7, generator=g) * 1000,
        "metadata_mask": torch.rand(batch, 7, generator=g) > 0.2,
        "cond": torch.rand(batch, channels, frames, LATENT * FACTOR, LATENT * FACTOR, generator=g) * 2 - 1,
        "cond_metadata": torch.rand(batch, frames, 7, generator=g) * 1000,
        "cond_metadata_mask": torch.rand(batch, frames, 7, generator=g) > 0.2,
    }


@pytest.mark.parametrize(("channels", "frames"), [(3, 1), (10, 3), (13, 5), (4, 3)])
def test_residual_shapes_match_the_unet_skips(unet: SatUNet, channels: int, frames: int) -> None:
    cn = _controlnet(unet, channels)
    x = _inputs(2, channels, frames)
    down, mid = cn(**x)
    channels_per_res, _ = residual_layout(unet.config.block_out_channels, unet.config.layers_per_block)
    assert len(down) == cn.num_residuals == len(channels_per_res) == 4
    sizes = [LATENT, LATENT, LATENT // 2, LATENT // 2]
    assert [tuple(d.shape) for d in down] == [
        (2, c, s, s) for c, s in zip(channels_per_res, sizes, strict=True)
    ]
    assert tuple(mid.shape) == (2, 64, LATENT // 2, LATENT // 2)
    # they plug into the UNet as its additional residuals
    out = controlled_unet_forward(unet, cn, **{k: v for k, v in x.items()})
    assert out.shape == x["sample"].shape


def test_sd21_layout_has_12_residuals_and_reference_temporal_positions() -> None:
    channels, after_down = residual_layout((320, 640, 1280, 1280), 2)
    assert len(channels) == 12 and after_down == [3, 6, 9]
    assert default_temporal_layers((320, 640, 1280, 1280), 2) == [0, 3, 6, 9]


def test_default_conditioning_embedder_reaches_latent_size(unet: SatUNet) -> None:
    """16/32/96/256 channels, log2(VAE factor) stride-(1,2,2) stages; factor 8 → 3 stages (SD's VAE)."""
    cn = ControlNet3D.from_unet(unet, 13, vae_scale_factor=8)
    strides = [m.stride for m in cn.cond_embedding.blocks if m.kernel_size == (1, 3, 3)]
    assert strides == [(1, 2, 2)] * 3
    assert [m.out_channels for m in cn.cond_embedding.blocks[1::2]] == [32, 96, 256]
    x = _inputs(1, 13, 2)
    x["cond"] = torch.rand(1, 13, 2, LATENT * 8, LATENT * 8)
    emb = cn.cond_embedding(x["cond"])
    assert tuple(emb.shape) == (1, 32, 2, LATENT, LATENT)
    assert torch.count_nonzero(emb) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="vae_scale_factor"):
        cn(**_inputs(1, 13, 2))  # 16 px frames for a factor-8 ControlNet


def test_fresh_controlnet_leaves_base_output_exactly_unchanged(unet: SatUNet) -> None:
    cn = _controlnet(unet, 10)
    x = _inputs(3, 10, 3)
    base = unet(
        x["sample"],
        x["timestep"],
        x["encoder_hidden_states"],
        metadata=x["metadata"],
        metadata_mask=x["metadata_mask"],
    ).sample
    controlled = controlled_unet_forward(unet, cn, **x)
    assert torch.equal(base, controlled)
    down, mid = cn(**x)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0


def test_gradients_reach_only_the_controlnet(unet: SatUNet) -> None:
    cn = _controlnet(unet, 4)
    opt = torch.optim.SGD(cn.parameters(), lr=0.5)
    x = _inputs(2, 4, 3)
    for _ in range(3):  # zero convs, then the embedder output conv, then everything gets gradients
        opt.zero_grad()
        controlled_unet_forward(unet, cn, **x).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is None for p in unet.parameters())
    assert all(not p.requires_grad for p in unet.parameters())
    grads = {n: p.grad for n, p in cn.named_parameters()}
    assert grads["controlnet_down_blocks.0.weight"].abs().sum() > 0
    assert grads["down_blocks.0.resnets.0.conv1.weight"].abs().sum() > 0
    assert grads["cond_embedding.conv_in.weight"].abs().sum() > 0
    assert grads["cond_metadata_embedding.mlps.0.linear_1.weight"].abs().sum() > 0


def test_temporal_gate_is_clamped_to_unit_interval(unet: SatUNet) -> None:
    cn = _controlnet(unet, 4)
    _randomise(cn)
    x = _inputs(1, 4, 3)
    key = next(iter(cn.temporal_gates))
    results = {}
    for value in (-0.7, 0.0, 1.0, 1.8):
        with torch.no_grad():
            cn.temporal_gates[key].fill_(value)
        results[value] = cn(**x)[0][int(key)]
    assert torch.equal(results[-0.7], results[0.0]) and torch.equal(results[1.8], results[1.0])
    assert not torch.equal(results[0.0], results[1.0])
    # straight-through: a gate below 0 still gets a gradient; the projection puts it back in [0, 1]
    with torch.no_grad():
        cn.temporal_gates[key].fill_(-0.7)
    cn(**x)[0][int(key)].pow(2).sum().backward()
    assert cn.temporal_gates[key].grad is not None and cn.temporal_gates[key].grad.abs() > 0
    opt = torch.optim.SGD([cn.temporal_gates[key]], lr=100.0)
    for _ in range(3):
        opt.zero_grad()
        (-cn(**x)[0][int(key)].abs().sum()).backward()
        opt.step()
        cn.clamp_temporal_gates_()
        assert 0.0 <= float(cn.temporal_gates[key].detach()) <= 1.0
    assert all(0.0 <= v <= 1.0 for v in cn.temporal_gate_values().values())


def test_residuals_do_not_depend_on_frame_order_and_T_can_change(unet: SatUNet) -> None:
    """With per-frame embedding (temporal kernel 1) the temporal attention and the mean over T make the
    residuals invariant to the order of the frames (each carrying its metadata); any T is accepted."""
    cn = _controlnet(unet, 3, conditioning_temporal_kernel=1)
    _randomise(cn)
    x = _inputs(2, 3, 4)
    perm = torch.tensor([2, 0, 3, 1])
    y = dict(
        x,
        cond=x["cond"][:, :, perm],
        cond_metadata=x["cond_metadata"][:, perm],
        cond_metadata_mask=x["cond_metadata_mask"][:, perm],
    )
    with torch.no_grad():
        a, b = cn(**x), cn(**y)
        for r, s in zip((*a[0], a[1]), (*b[0], b[1]), strict=True):
            torch.testing.assert_close(r, s, rtol=1e-4, atol=1e-5)
        # frame metadata matters (its own embedding) and so does the conditioning scale
        z = dict(x, cond_metadata=x["cond_metadata"].flip(1))
        assert not torch.allclose(cn(**z)[1], a[1])
        half = cn(**x, conditioning_scale=0.5)
        torch.testing.assert_close(half[1], a[1] * 0.5)
        assert cn(**_inputs(2, 3, 7))[1].shape == a[1].shape


def test_save_load_round_trip(unet: SatUNet, tmp_path: Path) -> None:
    cn = _controlnet(unet, 13, temporal_layers=[0, 2, 3])
    _randomise(cn)
    cn.save_pretrained(tmp_path / "cn")
    assert (tmp_path / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ControlNet3D.from_pretrained(tmp_path / "cn")
    assert loaded.config.temporal_layers == [0, 2, 3] and loaded.config.conditioning_channels == 13
    assert set(loaded.state_dict()) == set(cn.state_dict())
    for name, tensor in cn.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    # Two instances: the loaded weights are views into the safetensors file (not 64-byte aligned), so CPU
    # kernels may round differently; the weights themselves are compared exactly above.
    x = _inputs(1, 13, 2)
    with torch.no_grad():
        got = loaded(**x)[1]
        torch.testing.assert_close(got, cn(**x)[1], rtol=ROUND_TRIP_TOL, atol=ROUND_TRIP_TOL)  # scale ~1
        cn.controlnet_mid_block.weight.view(-1)[0] += 0.01  # one wrong weight: ~100x the tolerance
        assert (cn(**x)[1] - got).abs().max() > 50 * ROUND_TRIP_TOL


def test_bad_inputs_raise_clear_errors(unet: SatUNet) -> None:
    cn = _controlnet(unet, 4)
    with pytest.raises(ValueError, match="channels"):
        cn(**_inputs(1, 5, 1))
    with pytest.raises(ValueError, match="temporal_layers"):
        _controlnet(unet, 4, temporal_layers=[99])
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNet3D.from_unet(type("U", (), {"config": {"class_embed_type": "timestep"}})(), 3)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def base_pipe(unet: SatUNet) -> DiffusionSatPipeline:
    torch.manual_seed(2)
    return DiffusionSatPipeline(
        unet=unet,
        vae=make_tiny_vae(2).eval(),
        text_encoder=HashTextEncoder(hidden_size=32),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )


def _pipe(base_pipe: DiffusionSatPipeline, channels: int) -> SatControlNetPipeline:
    pipe = SatControlNetPipeline.from_diffusionsat(base_pipe, _controlnet(base_pipe.unet, channels))
    pipe.set_progress_bar_config(disable=True)
    return pipe


FRAMES = [
    SatMetadata(lon=12.7, lat=52.8, gsd=10.0, year=2016, month=5, day=29),
    SatMetadata(lon=12.7, lat=52.8, gsd=10.0, year=2016, month=6, day=8),
]
TARGET = SatMetadata(lon=12.7, lat=52.8, gsd=10.0, year=2016, month=6, day=18)


def test_pipeline_with_fresh_controlnet_matches_base_pipeline(base_pipe: DiffusionSatPipeline) -> None:
    pipe = _pipe(base_pipe, 3)
    cond = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    latents = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    base_pipe.set_progress_bar_config(disable=True)
    ours = pipe(
        cond, FRAMES, TARGET, "a satellite image", num_inference_steps=3, latents=latents, output_type="pt"
    ).images
    ref = base_pipe(
        ["a satellite image"] * 2,
        metadata=TARGET,
        num_inference_steps=3,
        guidance_scale=1.0,
        latents=latents,
        height=16,
        width=16,
        output_type="pt",
    ).images
    assert torch.equal(ours, ref)  # exact: the same UNet/VAE/encoder instances, the ControlNet adds zeros


def test_pipeline_save_load_round_trip(base_pipe: DiffusionSatPipeline, tmp_path: Path) -> None:
    pipe = _pipe(base_pipe, 4)
    _randomise(pipe.controlnet)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SatControlNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.controlnet, ControlNet3D) and isinstance(loaded.unet, SatUNet)
    cond = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    kwargs = dict(
        num_inference_steps=2, guidance_scale=2.0, output_type="np", controlnet_conditioning_scale=0.8
    )

    def run(p: SatControlNetPipeline) -> np.ndarray:
        gen = torch.Generator().manual_seed(0)
        return p(cond, [FRAMES[0]] * 3, TARGET, "x", generator=gen, **kwargs).images

    a, b = run(pipe), run(loaded)
    assert a.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(b, a, rtol=0, atol=IMAGE_TOL)  # two instances: see test_save_load_round_trip
    with torch.no_grad():
        loaded.controlnet.controlnet_down_blocks[0].weight.view(-1)[0] += 0.05  # one wrong weight
    assert np.abs(run(loaded) - a).max() > 50 * IMAGE_TOL


def test_inpainting_keeps_unmasked_pixels_exactly(base_pipe: DiffusionSatPipeline) -> None:
    """Tolerance: exact in float ([0, 1] output) and exact after uint8 rounding (PIL output)."""
    pipe = _pipe(base_pipe, 4)
    _randomise(pipe.controlnet)
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 3:9, 4:12] = 1
    mask[1, :, 8:, :] = 1
    out = pipe(None, None, TARGET, image=image, mask=mask, num_inference_steps=3, output_type="pt").images
    keep = mask.expand_as(image) < 0.5
    assert torch.equal(out[keep], (image / 2 + 0.5)[keep])
    assert not torch.allclose(out[~keep], (image / 2 + 0.5)[~keep], atol=1e-3)  # the hole was generated
    pil = pipe(
        inpainting_condition(image, mask),
        None,
        TARGET,
        image=image,
        mask=mask[:, 0],
        num_inference_steps=3,
        output_type="pil",
    ).images
    expected = ((image / 2 + 0.5).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for k, img in enumerate(pil):
        arr = np.asarray(img)
        np.testing.assert_array_equal(
            arr[~mask[k, 0].bool().numpy()], expected[k][~mask[k, 0].bool().numpy()]
        )
    with pytest.raises(ValueError, match="both"):
        pipe(None, None, image=image)


def test_conditioning_scale_zero_is_the_base_model(base_pipe: DiffusionSatPipeline) -> None:
    pipe = _pipe(base_pipe, 3)
    _randomise(pipe.controlnet)
    cond = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(9))
    run = {"num_inference_steps": 2, "latents": latents, "output_type": "pt"}
    off = pipe(cond, None, TARGET, controlnet_conditioning_scale=0.0, **run).images
    on = pipe(cond, None, TARGET, **run).images
    ref = base_pipe(metadata=TARGET, guidance_scale=1.0, height=16, width=16, **run).images
    assert torch.equal(off, ref) and not torch.equal(on, ref)  # exact: same instances, residuals x 0


# ------------------------------------------------------------------------------------------ image-to-image
def _init_image(seed: int) -> torch.Tensor:
    """A smooth (2, 3, 16, 16) image in [-1, 1] (the kind of input an SR baseline is)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8
    return torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)


def _img2img(pipe: SatControlNetPipeline, steps: int = 10, **kwargs) -> torch.Tensor:
    cond = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(6))
    return pipe(
        cond, None, TARGET, num_inference_steps=steps, latents=latents, output_type="pt", **kwargs
    ).images


def test_strength_one_is_the_pure_noise_start(base_pipe: DiffusionSatPipeline) -> None:
    pipe = _pipe(base_pipe, 3)
    _randomise(pipe.controlnet)
    plain = _img2img(pipe, steps=4)
    full = _img2img(pipe, steps=4, init_image=_init_image(0), strength=1.0)
    torch.testing.assert_close(full, plain, rtol=0, atol=IMAGE_TOL)


def _calibrated_pipe(base_pipe: DiffusionSatPipeline, init: torch.Tensor) -> SatControlNetPipeline:
    """A pipeline whose tiny VAE's scaling factor gives unit-std latents (as a trained VAE's is set), so
    that the noise of a timestep means what it means for a real model."""
    vae = make_tiny_vae(2, seed=3).eval()
    with torch.no_grad():
        std = vae.encode(init).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    pipe = SatControlNetPipeline(
        unet=base_pipe.unet,
        controlnet=_controlnet(base_pipe.unet, 3),
        vae=vae,
        text_encoder=base_pipe.text_encoder,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    _randomise(pipe.controlnet)
    return pipe


def test_small_strength_stays_near_the_init_image(base_pipe: DiffusionSatPipeline) -> None:
    """Tolerance: 0.02 in [0, 1]; the pure-noise output and another init image are ≥ 5x further away."""
    init = _init_image(0)
    pipe = _calibrated_pipe(base_pipe, init)
    with torch.no_grad():
        recon = (decode_latents(pipe.vae, encode_latents(pipe.vae, init)) / 2 + 0.5).clamp(0, 1)
    near = _img2img(pipe, steps=20, init_image=init, strength=0.05)  # one step, from t = 1
    far = _img2img(pipe, steps=20)
    other = _img2img(pipe, steps=20, init_image=_init_image(1), strength=0.05)
    err = (near - recon).abs().mean().item()
    assert err < 0.02
    assert (far - recon).abs().mean().item() > 5 * err
    assert (other - recon).abs().mean().item() > 5 * err


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.3), (10, 0.74), (7, 0.5), (5, 0.01)])
def test_only_the_last_strength_fraction_of_steps_runs(
    base_pipe: DiffusionSatPipeline, scheduler: type, steps: int, strength: float
) -> None:
    pipe = _pipe(base_pipe, 3)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    timesteps: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: timesteps.append(int(args[1])))
    try:
        out = _img2img(pipe, steps=steps, init_image=_init_image(0), strength=strength)
    finally:
        hook.remove()
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    expected = max(round(steps * strength), 1)
    pipe.scheduler.set_timesteps(steps)
    assert timesteps == pipe.scheduler.timesteps[steps - expected :].tolist()


def test_bad_img2img_inputs_raise_clear_errors(base_pipe: DiffusionSatPipeline) -> None:
    pipe = _pipe(base_pipe, 3)
    with pytest.raises(ValueError, match="strength must be in"):
        _img2img(pipe, steps=2, init_image=_init_image(0), strength=0.0)
    with pytest.raises(ValueError, match="needs an init_image"):
        _img2img(pipe, steps=2, strength=0.5)
    with pytest.raises(ValueError, match="init_image must be"):
        _img2img(pipe, steps=2, init_image=_init_image(0)[:, :, :8], strength=0.5)
