"""Registered options of ControlNet3D and the pipelines that let a converted reference checkpoint compute
what the reference computes (the defaults are covered by test_controlnet.py / test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dsat_core.metadata import SatMetadata
from dsat_core.models import HashTextEncoder, SatUNet, make_tiny_vae, scheduler_config, unet_config
from dsat_core.models.controlnet3d import ControlNet3D, freeze
from dsat_core.models.metadata_embedding import set_missing_metadata
from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline

LATENT = 8
FACTOR = 2  # tiny VAE
NEW_OPTIONS = (
    "temporal_attention_heads",
    "temporal_mixing",
    "frame_reduction",
    "conditioning_downsample_factor",
    "conditioning_range",
    "share_cond_metadata_embedding",
)
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def unet() -> SatUNet:
    torch.manual_seed(0)
    model = SatUNet(**unet_config("tiny", sample_size=LATENT))
    for p in model.metadata_embedding.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return freeze(model)


def _controlnet(unet: SatUNet, channels: int = 3, **kwargs: Any) -> ControlNet3D:
    torch.manual_seed(1)
    kwargs.setdefault("vae_scale_factor", FACTOR)
    return ControlNet3D.from_unet(unet, channels, (8, 16), **kwargs).eval()


def _randomise(model: torch.nn.Module, std: float = 0.05, seed: int = 3) -> None:
    """Trained-looking weights in the zero-initialised outputs, gates at 0.5."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "controlnet_" in name or "cond_embedding.conv_out" in name:
                torch.nn.init.normal_(p, std=std)
            if "temporal_gates" in name:
                p.fill_(0.5)


def _inputs(batch: int, channels: int, frames: int, cond_factor: int = FACTOR, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = LATENT * cond_factor
    return {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "metadata": torch.rand(batch, 7, generator=g) * 1000,
        "metadata_mask": torch.rand(batch, 7, generator=g) > 0.2,
        "cond": torch.rand(batch, channels, frames, side, side, generator=g) * 2 - 1,
        "cond_metadata": torch.rand(batch, frames, 7, generator=g) * 1000,
        "cond_metadata_mask": torch.rand(batch, frames, 7, generator=g) > 0.2,
    }


def _outputs(model: ControlNet3D, x: dict, **kwargs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = model(**x, **kwargs)
    return [*down, mid]


def _assert_outputs_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (r, s) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(r, s, **TOL, msg=lambda m, i=i: f"residual {i}: {m}")


def _twin(model: ControlNet3D, unet: SatUNet, **kwargs: Any) -> ControlNet3D:
    """A ControlNet3D with other options and ``model``'s weights."""
    twin = _controlnet(unet, model.config.conditioning_channels, **kwargs)
    twin.load_state_dict(model.state_dict())
    return twin


# ------------------------------------------------------------------------------------------------- defaults
def test_defaults_are_todays_behaviour(unet: SatUNet) -> None:
    cn = _controlnet(unet)
    assert cn.config.temporal_attention_heads is None
    assert cn.config.temporal_mixing == "before_zero_conv"
    assert cn.config.frame_reduction == "mean"
    assert cn.config.conditioning_downsample_factor is None and cn.conditioning_factor == FACTOR
    assert list(cn.config.conditioning_range) == [-1.0, 1.0]
    assert cn.config.share_cond_metadata_embedding is False
    assert (
        cn.cond_metadata_embedding is not None and cn.frame_metadata_embedding is cn.cond_metadata_embedding
    )
    x = torch.rand(2, 3)
    assert cn.map_conditioning_range(x) is x  # no arithmetic at all on the default range


# ------------------------------------------------------------------------------------------ frame_reduction
def test_frame_reduction_sum_is_mean_times_frames(unet: SatUNet) -> None:
    mean = _controlnet(unet)
    _randomise(mean)
    total = _twin(mean, unet, frame_reduction="sum")
    assert total.config.frame_reduction == "sum"
    frames = 3
    x = _inputs(2, 3, frames)
    a, b = _outputs(mean, x), _outputs(total, x)
    assert len(a) == 5  # 4 down residuals + mid: sum applies to both
    for r, s in zip(a, b, strict=True):
        torch.testing.assert_close(s, r * frames, **TOL)
        assert not torch.allclose(s, r)
    with pytest.raises(ValueError, match="frame_reduction"):
        _controlnet(unet, frame_reduction="max")


# ------------------------------------------------------------------------------------------ temporal_mixing
def _capture_zero_conv_inputs(model: ControlNet3D) -> tuple[dict[str, torch.Tensor], list[Any]]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i, conv in enumerate(model.controlnet_down_blocks):
        hooks.append(conv.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(str(i), a[0].clone())))
    hooks.append(
        model.controlnet_mid_block.register_forward_hook(
            lambda m, a, o: seen.__setitem__("mid", a[0].clone())
        )
    )
    return seen, hooks


def _gated(model: ControlNet3D, pos: int, x: torch.Tensor, frames: int) -> torch.Tensor:
    """α·attn(x) + (1 − α)·x on the (B·T, C, h, w) view, written out by hand."""
    key = str(pos)
    if key not in model.temporal_blocks:
        return x
    alpha = model.temporal_gates[key].detach().clamp(0, 1)
    return alpha * model.temporal_blocks[key](x, num_frames=frames).sample + (1 - alpha) * x


def test_after_zero_conv_matches_a_hand_computation(unet: SatUNet) -> None:
    before = _controlnet(unet)
    _randomise(before)
    with torch.no_grad():  # different gates so every temporal layer matters
        before.temporal_gates["0"].fill_(0.7)
        before.temporal_gates["2"].fill_(0.4)
    after = _twin(before, unet, temporal_mixing="after_zero_conv")
    batch, frames = 2, 3
    x = _inputs(batch, 3, frames)

    raw, hooks = _capture_zero_conv_inputs(after)  # "after": the zero convs see the raw encoder residuals
    out_after = _outputs(after, x)
    for h in hooks:
        h.remove()
    out_before = _outputs(before, x)

    expected_after, expected_before = [], []
    with torch.no_grad():
        for pos, conv in enumerate(after.controlnet_down_blocks):
            res = raw[str(pos)]  # (B, C, T, h, w)
            c, h, w = res.shape[1], res.shape[3], res.shape[4]
            zeroed = conv(res).transpose(1, 2).reshape(batch * frames, c, h, w)
            mixed = _gated(after, pos, zeroed, frames).reshape(batch, frames, c, h, w)
            expected_after.append(mixed.mean(dim=1))
            frames_view = res.transpose(1, 2).reshape(batch * frames, c, h, w)
            mixed = _gated(before, pos, frames_view, frames).reshape(batch, frames, c, h, w).transpose(1, 2)
            expected_before.append(conv(mixed).mean(dim=2))
        mid = after.controlnet_mid_block(raw["mid"]).mean(dim=2)
    _assert_outputs_close(out_after, [*expected_after, mid])
    _assert_outputs_close(out_before, [*expected_before, mid])
    for pos in (0, 2):  # the order matters at the temporal positions only
        assert not torch.allclose(out_after[pos], out_before[pos], atol=1e-4)
    torch.testing.assert_close(out_after[1], out_before[1], **TOL)


def test_after_zero_conv_fresh_model_outputs_zeros(unet: SatUNet) -> None:
    cn = _controlnet(unet, temporal_mixing="after_zero_conv")
    assert all(torch.count_nonzero(r) == 0 for r in _outputs(cn, _inputs(1, 3, 2)))
    with pytest.raises(ValueError, match="temporal_mixing"):
        _controlnet(unet, temporal_mixing="sometimes")


# ---------------------------------------------------------------------------------------------------- heads
def test_per_position_temporal_heads(unet: SatUNet) -> None:
    heads = [(8, 8), (4, 5), (2, 32)]  # inner dims 64, 20, 64 on residuals of 32, 32, 64 channels
    cn = _controlnet(unet, temporal_layers=[0, 2, 3], temporal_attention_heads=heads)
    assert cn.config.temporal_attention_heads == [[8, 8], [4, 5], [2, 32]]
    state = cn.state_dict()
    for pos, (num_heads, head_dim), width in zip((0, 2, 3), heads, (32, 32, 64), strict=True):
        block = cn.temporal_blocks[str(pos)]
        attn = block.transformer_blocks[0].attn1
        assert attn.heads == num_heads
        inner = num_heads * head_dim
        assert tuple(state[f"temporal_blocks.{pos}.proj_in.weight"].shape) == (inner, width)
        assert tuple(state[f"temporal_blocks.{pos}.proj_out.weight"].shape) == (width, inner)
        assert tuple(state[f"temporal_blocks.{pos}.transformer_blocks.0.attn1.to_q.weight"].shape) == (
            inner,
            inner,
        )
    # the attention runs over T with the inner width
    seen: dict[int, tuple[int, ...]] = {}
    for pos in (0, 2, 3):
        attn = cn.temporal_blocks[str(pos)].transformer_blocks[0].attn1
        attn.register_forward_hook(lambda m, a, o, pos=pos: seen.__setitem__(pos, tuple(o.shape)))
    _randomise(cn)
    down, mid = cn(**_inputs(2, 3, 3))
    assert seen == {0: (2 * 8 * 8, 3, 64), 2: (2 * 4 * 4, 3, 20), 3: (2 * 4 * 4, 3, 64)}
    assert [tuple(d.shape[1:]) for d in down] == [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4)]
    # None: today's rule, width // min(temporal_attention_head_dim, width)
    default = _controlnet(unet, temporal_attention_head_dim=16)
    assert [default.temporal_blocks[k].transformer_blocks[0].attn1.heads for k in ("0", "2")] == [2, 2]


def test_temporal_heads_validation(unet: SatUNet) -> None:
    with pytest.raises(ValueError, match="one pair per layer"):
        _controlnet(unet, temporal_attention_heads=[(8, 8)])  # default temporal_layers: 0 and 2
    with pytest.raises(ValueError, match="sorted"):
        _controlnet(unet, temporal_layers=[2, 0], temporal_attention_heads=[(8, 8), (4, 5)])
    with pytest.raises(ValueError, match="positive ints"):
        _controlnet(unet, temporal_attention_heads=[(8, 8), (4, 0)])


# --------------------------------------------------------------------------------------------- conditioning
def test_conditioning_downsample_factor_four_under_vae_factor_eight(unet: SatUNet) -> None:
    """The 2D SR ControlNet: 256 px input for a 512 px (64-latent) target → factor 4, two stride-2 stages."""
    torch.manual_seed(1)
    cn = ControlNet3D.from_unet(unet, 3, vae_scale_factor=8, conditioning_downsample_factor=4).eval()
    assert cn.conditioning_factor == 4
    strides = [m.stride for m in cn.cond_embedding.blocks if m.kernel_size == (1, 3, 3)]
    assert strides == [(1, 2, 2), (1, 2, 2), (1, 1, 1)]
    _randomise(cn)
    down, mid = cn(**_inputs(1, 3, 1, cond_factor=4))
    assert tuple(down[0].shape) == (1, 32, LATENT, LATENT) and tuple(mid.shape) == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="conditioning_downsample_factor"):
        cn(**_inputs(1, 3, 1, cond_factor=8))  # full-size frames
    with pytest.raises(ValueError, match="power of two"):
        ControlNet3D.from_unet(unet, 3, vae_scale_factor=8, conditioning_downsample_factor=3)


@pytest.mark.parametrize("low_high", [(0.0, 1.0), (-0.5, 2.0)])
def test_conditioning_range_maps_the_whole_cond_tensor(unet: SatUNet, low_high: tuple[float, float]) -> None:
    low, high = low_high
    default = _controlnet(unet, 4)
    _randomise(default)
    ranged = _twin(default, unet, conditioning_range=low_high)
    assert list(ranged.config.conditioning_range) == [low, high]
    x = _inputs(2, 4, 2)
    # the ranged model fed x in [-1, 1] == the default model fed x already mapped onto (low, high)
    mapped = dict(x, cond=low + (x["cond"] + 1) / 2 * (high - low))
    _assert_outputs_close(_outputs(ranged, x), _outputs(default, mapped))
    assert not torch.allclose(_outputs(ranged, x)[-1], _outputs(default, x)[-1], atol=1e-4)
    ends = ranged.map_conditioning_range(torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([low, (low + high) / 2, high]))


def test_conditioning_range_validation(unet: SatUNet) -> None:
    for bad in [(1.0, 0.0), (0.0,), (0.0, float("inf"))]:
        with pytest.raises(ValueError, match="conditioning_range"):
            _controlnet(unet, conditioning_range=bad)


# ------------------------------------------------------------------------------------------------- metadata
def test_shared_cond_metadata_embedding(unet: SatUNet, tmp_path: Path) -> None:
    shared = _controlnet(unet, share_cond_metadata_embedding=True)
    assert shared.cond_metadata_embedding is None
    assert shared.frame_metadata_embedding is shared.metadata_embedding
    assert not [k for k in shared.state_dict() if k.startswith("cond_metadata_embedding")]
    for name, p in unet.metadata_embedding.state_dict().items():  # from_unet copies the UNet's embedding
        torch.testing.assert_close(shared.metadata_embedding.state_dict()[name], p, rtol=0, atol=0)
    _randomise(shared)
    batch, frames = 2, 3
    rows: list[int] = []
    shared.metadata_embedding.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    x = _inputs(batch, 3, frames)
    out = _outputs(shared, x)
    assert rows == [batch, batch * frames]  # target, then every frame, through the one embedding

    # = a separate-embedding model whose frame embedding is a copy of the target one ...
    separate = _controlnet(unet)
    missing, unexpected = separate.load_state_dict(shared.state_dict(), strict=False)
    assert all(k.startswith("cond_metadata_embedding.") for k in missing) and missing and not unexpected
    separate.cond_metadata_embedding.load_state_dict(shared.metadata_embedding.state_dict())
    _assert_outputs_close(out, _outputs(separate, x))
    # ... and not one whose frame embedding differs
    with torch.no_grad():
        for p in separate.cond_metadata_embedding.parameters():
            p.add_(0.1)
    assert not torch.allclose(out[-1], _outputs(separate, x)[-1], atol=1e-4)

    # the embedding stays float32 in a half-precision load
    shared.save_pretrained(tmp_path / "cn")
    half = ControlNet3D.from_pretrained(tmp_path / "cn", torch_dtype=torch.float16)
    assert half.cond_metadata_embedding is None
    assert all(p.dtype == torch.float32 for p in half.metadata_embedding.parameters())
    assert half.conv_in.weight.dtype == torch.float16


def test_cond_metadata_layout_is_checked(unet: SatUNet) -> None:
    cn = _controlnet(unet)
    _randomise(cn)
    batch, frames = 2, 3
    x = _inputs(batch, 3, frames)
    transposed = x["cond_metadata"].transpose(1, 2)  # the reference's (B, 7, T)
    with pytest.raises(ValueError, match=r"cond_metadata must be \(B, T, F\).*transpose"):
        cn(**dict(x, cond_metadata=transposed.contiguous()))
    with pytest.raises(ValueError, match=r"cond_metadata_mask must be \(B, T, F\).*transpose"):
        cn(**dict(x, cond_metadata_mask=x["cond_metadata_mask"].transpose(1, 2)))
    with pytest.raises(ValueError, match=r"\(B, T, F\) = \(2, 3, 7\)"):
        cn(**dict(x, cond_metadata=torch.zeros(batch, frames + 1, 7)))
    # (B, F) still means "the same for every frame"
    one = dict(x, cond_metadata=x["cond_metadata"][:, 0], cond_metadata_mask=x["cond_metadata_mask"][:, 0])
    every = dict(
        x,
        cond_metadata=x["cond_metadata"][:, :1].expand(-1, frames, -1),
        cond_metadata_mask=x["cond_metadata_mask"][:, :1].expand(-1, frames, -1),
    )
    _assert_outputs_close(_outputs(cn, one), _outputs(cn, every))
    # the transposed values, put back into (B, T, F), give the reference's per-frame result
    _assert_outputs_close(_outputs(cn, dict(x, cond_metadata=transposed.transpose(1, 2))), _outputs(cn, x))


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trips_every_option(unet: SatUNet, tmp_path: Path) -> None:
    options = {
        "temporal_layers": [0, 2],
        "temporal_attention_heads": [(8, 8), (4, 5)],
        "temporal_mixing": "after_zero_conv",
        "frame_reduction": "sum",
        "conditioning_downsample_factor": 2,
        "conditioning_range": (0.0, 1.0),
        "share_cond_metadata_embedding": True,
    }
    cn = _controlnet(unet, 4, vae_scale_factor=4, **options)
    _randomise(cn)
    cn.save_pretrained(tmp_path / "cn")
    saved = json.loads((tmp_path / "cn" / "config.json").read_text())
    loaded = ControlNet3D.from_pretrained(tmp_path / "cn").eval()
    for key in NEW_OPTIONS:
        assert loaded.config[key] == cn.config[key] == saved[key], key
    assert saved["temporal_attention_heads"] == [[8, 8], [4, 5]] and saved["conditioning_range"] == [0.0, 1.0]
    assert loaded.conditioning_factor == 2 and loaded.cond_metadata_embedding is None
    assert set(loaded.state_dict()) == set(cn.state_dict())
    for name, tensor in cn.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    x = _inputs(2, 4, 3, cond_factor=2)
    _assert_outputs_close(_outputs(loaded, x), _outputs(cn, x))


# ------------------------------------------------------------------------------------------------ pipelines
PROMPT = "a satellite image of a farm"
MD = SatMetadata(lon=-122.4, lat=37.8, gsd=0.5, cloud_cover=0.05, year=2019, month=6, day=2)


def _base_pipe(unet: SatUNet, vae_downsample: int = FACTOR, **kwargs: Any) -> DiffusionSatPipeline:
    torch.manual_seed(2)
    pipe = DiffusionSatPipeline(
        unet=unet,
        vae=make_tiny_vae(vae_downsample).eval(),
        text_encoder=HashTextEncoder(hidden_size=32).eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def zero_unet() -> SatUNet:
    """A UNet trained the reference's way: missing fields embedded as zeros."""
    torch.manual_seed(0)
    model = SatUNet(**unet_config("tiny", sample_size=LATENT))
    for p in model.metadata_embedding.parameters():
        torch.nn.init.normal_(p, std=0.5)
    set_missing_metadata(model, "zero")
    return freeze(model)


def _unet_metadata_calls(unet: SatUNet) -> tuple[list[dict[str, torch.Tensor]], Any]:
    calls: list[dict[str, torch.Tensor]] = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        calls.append({k: kwargs[k].clone() for k in ("metadata", "metadata_mask")})

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_uncond_metadata_zero_is_the_reference_guidance(zero_unet: SatUNet) -> None:
    pipe = _base_pipe(zero_unet, uncond_metadata="zero")
    assert pipe.config.uncond_metadata == "zero" == pipe.uncond_metadata
    steps, scale = 3, 4.0
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    calls, handle = _unet_metadata_calls(zero_unet)
    try:
        out = pipe(
            PROMPT, MD, num_inference_steps=steps, guidance_scale=scale, latents=latents, output_type="latent"
        ).images
    finally:
        handle.remove()
    values, mask = pipe.encode_metadata([MD], torch.device("cpu"))
    assert len(calls) == steps
    for call in calls:  # one batched call: (conditional, unconditional with ALL fields missing)
        torch.testing.assert_close(call["metadata"][:1], values)
        assert torch.equal(call["metadata_mask"][:1], mask) and not call["metadata_mask"][1:].any()
        assert torch.count_nonzero(call["metadata"][1:]) == 0

    # a hand-written sampler: e(∅ text, ∅ metadata) + g·(e(c, m) − e(∅, ∅))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    text = pipe.text_encoder.encode([PROMPT, ""])
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            e_c = zero_unet(inp, t, text[:1], metadata=values, metadata_mask=mask).sample
            e_u = zero_unet(inp, t, text[1:], metadata=None).sample
            x = scheduler.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(out, x, **TOL)
    # "keep" is a different guidance
    keep = _base_pipe(zero_unet)
    assert keep.config.uncond_metadata == "keep"
    kept = keep(
        PROMPT, MD, num_inference_steps=steps, guidance_scale=scale, latents=latents, output_type="latent"
    ).images
    assert not torch.allclose(kept, out, atol=1e-4)


def test_uncond_metadata_zero_rejects_metadata_guidance(zero_unet: SatUNet) -> None:
    pipe = _base_pipe(zero_unet, uncond_metadata="zero")
    with pytest.raises(ValueError, match="metadata_guidance_scale"):
        pipe(PROMPT, MD, num_inference_steps=1, guidance_scale=3.0, metadata_guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond_metadata"):
        _base_pipe(zero_unet, uncond_metadata="drop")


def test_uncond_metadata_round_trips_through_model_index(zero_unet: SatUNet, tmp_path: Path) -> None:
    pipe = _base_pipe(zero_unet, uncond_metadata="zero")
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    expected = pipe(PROMPT, MD, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["uncond_metadata"] == "zero"
    loaded = DiffusionSatPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.uncond_metadata == "zero"
    got = loaded(PROMPT, MD, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-5)
    _base_pipe(zero_unet).save_pretrained(tmp_path / "keep")
    assert json.loads((tmp_path / "keep" / "model_index.json").read_text())["uncond_metadata"] == "keep"


FRAMES = [
    SatMetadata(lon=12.7, lat=52.8, gsd=10.0, year=2016, month=5, day=29),
    SatMetadata(lon=12.7, lat=52.8, gsd=10.0, year=2016, month=6, day=8),
]


def _control_pipe(unet: SatUNet, mode: str) -> SatControlNetPipeline:
    base = _base_pipe(unet, uncond_metadata=mode)
    cn = _controlnet(unet, 3)
    _randomise(cn)
    pipe = SatControlNetPipeline.from_diffusionsat(base, cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["keep", "zero"])
def test_controlnet_pipeline_unconditional_branch(zero_unet: SatUNet, mode: str) -> None:
    pipe = _control_pipe(zero_unet, mode)
    assert pipe.config.uncond_metadata == mode  # from_diffusionsat carries it
    cn_calls: list[tuple] = []
    cn_hook = pipe.controlnet.register_forward_pre_hook(lambda m, a: cn_calls.append(a))
    unet_calls, unet_hook = _unet_metadata_calls(zero_unet)
    cond = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    try:
        pipe(cond, FRAMES, MD, PROMPT, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    finally:
        cn_hook.remove()
        unet_hook.remove()
    assert len(cn_calls) == len(unet_calls) == 2
    values, mask = pipe.encode_metadata([MD], torch.device("cpu"))
    frame_values, frame_mask = pipe.encode_frame_metadata(FRAMES, None, 1, 2, torch.device("cpu"))
    for args, call in zip(cn_calls, unet_calls, strict=True):
        md, md_mask, cond_in, fr, fr_mask = args[3], args[4], args[5], args[6], args[7]
        torch.testing.assert_close(cond_in[1:], cond_in[:1])  # the conditioning itself is in both
        torch.testing.assert_close(md[:1], values)
        torch.testing.assert_close(fr[:1], frame_values)
        assert torch.equal(md_mask[:1], mask) and torch.equal(fr_mask[:1], frame_mask)
        assert torch.equal(call["metadata_mask"], md_mask)
        if mode == "zero":
            assert not md_mask[1:].any() and not fr_mask[1:].any()
            assert torch.count_nonzero(md[1:]) == 0 and torch.count_nonzero(fr[1:]) == 0
        else:
            assert torch.equal(md_mask[1:], mask) and torch.equal(fr_mask[1:], frame_mask)
            torch.testing.assert_close(fr[1:], frame_values)


def test_controlnet_pipeline_uncond_metadata_round_trip(zero_unet: SatUNet, tmp_path: Path) -> None:
    pipe = _control_pipe(zero_unet, "zero")
    assert (
        SatControlNetPipeline.from_diffusionsat(pipe, pipe.controlnet, "keep").config.uncond_metadata
        == "keep"
    )
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["uncond_metadata"] == "zero"
    loaded = SatControlNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.uncond_metadata == "zero"
    cond = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    a = pipe(cond, FRAMES, MD, PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(cond, FRAMES, MD, PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(a, b, **TOL)


def test_controlnet_pipeline_output_size_follows_conditioning_factor(unet: SatUNet) -> None:
    """VAE factor 4, conditioning factor 2: 16 px conditioning → 8 latents → 32 px images."""
    base = _base_pipe(unet, vae_downsample=4)
    cn = _controlnet(unet, 3, vae_scale_factor=4, conditioning_downsample_factor=2)
    _randomise(cn)
    pipe = SatControlNetPipeline.from_diffusionsat(base, cn)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.conditioning_factor == 2
    cond = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    run = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert tuple(pipe(cond, None, MD, output_type="latent", **run).images.shape) == (1, 4, LATENT, LATENT)
    assert pipe(cond, None, MD, output_type="np", **run).images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="conditioning factor"):
        pipe(torch.rand(1, 3, 1, 15, 15), None, MD, num_inference_steps=1)
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="inpainting"):
        pipe(cond, None, MD, image=image, mask=mask, num_inference_steps=1)
    # the ControlNet must still be built for the pipeline's VAE
    with pytest.raises(ValueError, match="vae_scale_factor"):
        SatControlNetPipeline.from_diffusionsat(base, _controlnet(unet, 3, conditioning_downsample_factor=2))
