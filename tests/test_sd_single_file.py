"""SD 2.1 single-file checkpoints (LDM layout), written tiny by the test itself, loaded into a SatUNet."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from dsat_core.models import ControlNet3D, SatUNet, make_tiny_vae, scheduler_config, unet_config
from dsat_core.models.controlnet3d import residual_layout
from dsat_core.models.sd_single_file import (
    SD21_LICENSE,
    TEXT_NOT_LOADED,
    infer_variant,
    ldm_unet_config,
    ldm_unet_key,
    load_sd_single_file,
    map_state_dict,
    model_card,
)
from dsat_core.models.weights_io import sha256_file

LATENT = 16
HEAD_CHANNELS = 8
TINY_UNET = {
    "sample_size": LATENT,
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": (4, 4, 8),  # = width // HEAD_CHANNELS, the loader's rule
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
    "use_linear_projection": True,
}

ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "use_linear_projection",
    "norm_num_groups",
)


def _plain(value):
    """JSON-loaded configs give lists; compare as tuples."""
    return tuple(value) if isinstance(value, list | tuple) else value


# ----------------------------------------------------------------------------------------------------------
# diffusers → LDM names, written independently of the loader (and checked against diffusers' converter)
# ----------------------------------------------------------------------------------------------------------
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_to_ldm(rest: str) -> str:
    module, param = rest.rsplit(".", 1)
    return f"{_RESNET_TO_LDM[module]}.{param}"


def unet_key_to_ldm(name: str, layers: int, up_has_attention: list[bool]) -> str:
    """LDM name (without ``model.diffusion_model.``) of a diffusers UNet tensor."""
    module, param = name.rsplit(".", 1)
    if module in _UNET_TOP_TO_LDM:
        return f"{_UNET_TOP_TO_LDM[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        index = 1 + int(m[1]) * (layers + 1) + int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{index}.0.{_resnet_to_ldm(m[4])}"
        return f"input_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", name):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet_to_ldm(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        index = int(m[1]) * (layers + 1) + int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{index}.0.{_resnet_to_ldm(m[4])}"
        return f"output_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", name):
        block = int(m[1])
        child = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{child}.conv.{m[2]}"
    raise KeyError(name)


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    config = unet.config
    up_attention = ["CrossAttn" in t for t in config.up_block_types]
    layers = config.layers_per_block
    return {unet_key_to_ldm(k, layers, up_attention): v for k, v in unet.state_dict().items()}


def vae_key_to_ldm(name: str, num_blocks: int) -> str:
    """LDM name (without ``first_stage_model.``) of a diffusers AutoencoderKL tensor."""
    name = name.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", name):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        level = num_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", name):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return name  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """LDM VAE state: attention projections are 1×1 convs there, (C, C, 1, 1)."""
    blocks = len(vae.config.block_out_channels)
    out = {}
    for name, tensor in vae.state_dict().items():
        ldm = vae_key_to_ldm(name, blocks)
        out[ldm] = tensor[:, :, None, None] if ".attn_1." in ldm and tensor.ndim == 2 else tensor
    return out


def _scaled_linear_betas() -> torch.Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).float() ** 2


def write_checkpoint(
    path: Path, unet: UNet2DConditionModel, vae: AutoencoderKL | None = None, *, pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Write an SD-style single file (UNet, VAE, two fake OpenCLIP tensors, betas); return its state."""
    state = {f"model.diffusion_model.{k}": v.clone() for k, v in unet_to_ldm(unet).items()}
    if vae is not None:
        state |= {f"first_stage_model.{k}": v.clone() for k, v in vae_to_ldm(vae).items()}
    state["cond_stage_model.model.positional_embedding"] = torch.randn(77, 32)
    state["cond_stage_model.model.ln_final.weight"] = torch.ones(32)
    state["betas"] = _scaled_linear_betas()
    if pickle:
        torch.save({"state_dict": state, "global_step": 10}, path)
    else:
        save_file(state, path)
    return state


@pytest.fixture(scope="module")
def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny", **TINY_UNET))
    with torch.no_grad():  # "trained": no zero-initialised output layers
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return unet.eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return make_tiny_vae(downsample=2, seed=1).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sd_unet, vae) -> Path:
    path = tmp_path_factory.mktemp("single-file") / "v2-1_512-tiny.safetensors"
    write_checkpoint(path, sd_unet, vae)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    return load_sd_single_file(checkpoint, sample_size=LATENT, head_channels=HEAD_CHANNELS)


def _load(path: Path, **kwargs):
    return load_sd_single_file(path, sample_size=LATENT, head_channels=HEAD_CHANNELS, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# the fake checkpoint is the real layout
# ----------------------------------------------------------------------------------------------------------
def test_fake_checkpoint_is_what_diffusers_converter_reads(checkpoint: Path, sd_unet, vae) -> None:
    state = load_file(checkpoint)
    unet_back = convert_ldm_unet_checkpoint(state, dict(sd_unet.config))
    assert unet_back.keys() == sd_unet.state_dict().keys()
    for name, tensor in sd_unet.state_dict().items():
        assert torch.equal(unet_back[name], tensor), name
    vae_back = convert_ldm_vae_checkpoint(state, dict(vae.config))
    assert vae_back.keys() == vae.state_dict().keys()
    for name, tensor in vae.state_dict().items():
        assert torch.equal(vae_back[name], tensor), name


def test_sd21_architecture_derived_from_shapes() -> None:
    """The full SD 2.1 UNet (on the meta device: shapes only) gives SD 2.1's config and a 1:1 mapping."""
    reference = unet_config("sd21-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**reference)
    ldm = unet_to_ldm(unet)
    assert len(ldm) == 686
    config = ldm_unet_config(ldm)
    for key in ARCHITECTURE_KEYS:
        assert _plain(config[key]) == _plain(reference[key]), key
    assert config["attention_head_dim"] == (5, 10, 20, 20)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    mapped = map_state_dict(ldm, lambda k: ldm_unet_key(k, 2), expected, "model.diffusion_model.")
    assert mapped.keys() == expected.keys()


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------
def test_every_tensor_arrives(loaded, sd_unet, vae) -> None:
    assert isinstance(loaded.unet, SatUNet)
    got = {k: v for k, v in loaded.unet.state_dict().items() if not k.startswith("metadata_embedding.")}
    want = sd_unet.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert loaded.vae is not None
    got_vae = loaded.vae.state_dict()
    assert got_vae.keys() == vae.state_dict().keys()
    for name, tensor in vae.state_dict().items():
        assert torch.equal(got_vae[name], tensor), name
    for key in ARCHITECTURE_KEYS:
        assert _plain(loaded.unet.config[key]) == _plain(sd_unet.config[key]), key


def test_source_counts_every_tensor(loaded, checkpoint: Path, sd_unet, vae) -> None:
    source = loaded.source
    assert source["tensors"]["unet"] == len(sd_unet.state_dict())
    assert source["tensors"]["vae"] == len(vae.state_dict())
    assert source["tensors"]["total"] == len(load_file(checkpoint))
    assert source["not_loaded"]["cond_stage_model"] == {"tensors": 2, "reason": TEXT_NOT_LOADED}
    assert source["not_loaded"]["betas"]["tensors"] == 1
    assert source["betas_match_scheduler"] is True
    assert source["path"] == str(checkpoint.resolve())
    assert "width // 8" in source["unet_config_rule"]


def test_sha256_is_hashlib(loaded, checkpoint: Path) -> None:
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert loaded.source["sha256"] == expected
    assert sha256_file(checkpoint, chunk_size=7) == expected


def _unet_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
    }


def test_sat_unet_forward_equals_source_unet(loaded, sd_unet) -> None:
    x = _unet_inputs()
    metadata = torch.rand(2, 7) * 100
    with torch.no_grad():
        want = sd_unet(**x).sample
        got = loaded.unet(**x, metadata=metadata, metadata_mask=torch.ones(2, 7, dtype=torch.bool)).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_vae_decodes_as_source(loaded, vae) -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.vae.decode(latents).sample, vae.decode(latents).sample, atol=1e-5, rtol=0
        )


def test_controlnet3d_builds_from_loaded_unet(loaded) -> None:
    torch.manual_seed(1)
    controlnet = ControlNet3D.from_unet(loaded.unet, conditioning_channels=3, vae_scale_factor=2)
    x = _unet_inputs()
    g = torch.Generator().manual_seed(2)
    cond = torch.rand(2, 3, 2, LATENT * 2, LATENT * 2, generator=g) * 2 - 1
    with torch.no_grad():
        down, mid = controlnet(
            x["sample"], x["timestep"], x["encoder_hidden_states"], torch.rand(2, 7), None, cond, None, None
        )
    channels, _ = residual_layout(loaded.unet.config.block_out_channels, loaded.unet.config.layers_per_block)
    assert [d.shape[1] for d in down] == channels
    assert mid.shape[:2] == (2, 64)


def test_no_vae_gives_none(tmp_path: Path, sd_unet) -> None:
    path = tmp_path / "unet-only.safetensors"
    write_checkpoint(path, sd_unet)
    result = _load(path)
    assert result.vae is None
    assert result.source["tensors"]["vae"] == 0


# ----------------------------------------------------------------------------------------------------------
# variant, heads rule, card
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("v2-1_512-ema-pruned.safetensors", None, "base"),
        ("v2-1_768-ema-pruned.safetensors", None, "768-v"),
        ("model.safetensors", None, "base"),
        ("v2-1_768-ema-pruned.safetensors", "base", "base"),
        ("model.safetensors", "768-v", "768-v"),
    ],
)
def test_variant_rule(name: str, given, expected: str) -> None:
    variant, rule = infer_variant(name, given)
    assert variant == expected
    assert ("given" in rule) == (given is not None)


def test_variant_sets_prediction_type(tmp_path: Path, checkpoint: Path, loaded) -> None:
    assert loaded.scheduler_config == scheduler_config("epsilon")
    assert loaded.unet.config.upcast_attention is False
    v_path = tmp_path / "v2-1_768-tiny.safetensors"
    v_path.write_bytes(checkpoint.read_bytes())
    v = _load(v_path)
    assert v.source["variant"] == "768-v"
    assert v.scheduler_config["prediction_type"] == "v_prediction"
    assert v.scheduler_config["beta_schedule"] == "scaled_linear"
    assert v.unet.config.upcast_attention is True
    assert _load(v_path, variant="base").scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="unknown SD 2.1 variant"):
        _load(v_path, variant="768")


def test_default_head_rule_needs_64_channel_heads(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 64 channels per head"):
        load_sd_single_file(checkpoint, sample_size=LATENT)


def test_attention_head_dim_override(tmp_path: Path) -> None:
    """diffusers' "tiny" UNet: 8 heads at every width, not derivable; given via unet_overrides."""
    torch.manual_seed(4)
    unet = UNet2DConditionModel(**unet_config("tiny", sample_size=LATENT, use_linear_projection=True)).eval()
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path, unet)
    result = load_sd_single_file(path, sample_size=LATENT, unet_overrides={"attention_head_dim": 8})
    assert result.unet.config.attention_head_dim == 8
    x = _unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(result.unet(**x).sample, unet(**x).sample, atol=1e-5, rtol=1e-5)
    assert "unet_overrides" in result.source["unet_config_rule"]


def test_model_card(loaded) -> None:
    card = model_card(loaded.source)
    assert loaded.source["path"] in card
    assert loaded.source["sha256"] in card
    assert "Variant: base (epsilon" in card
    assert SD21_LICENSE in card
    assert "not loaded (text encoder comes from --text-encoder)" in card


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
def test_truncated_file_is_named(tmp_path: Path, checkpoint: Path) -> None:
    path = tmp_path / "half.safetensors"
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"half\.safetensors is not a readable \.safetensors file"):
        _load(path)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = load_file(src)
    edit(state)
    save_file(state, dst)
    return dst


def test_renamed_tensor_is_named(tmp_path: Path, checkpoint: Path) -> None:
    old = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    new = "model.diffusion_model.input_blocks.1.0.in_layer.0.weight"

    def rename(state):
        state[new] = state.pop(old)

    path = _rewrite(checkpoint, tmp_path / "renamed.safetensors", rename)
    with pytest.raises(ValueError, match="renamed.safetensors") as err:
        _load(path)
    message = str(err.value)
    assert f"unmapped: {new}" in message
    assert "missing: down_blocks.0.resnets.0.norm1.weight" in message


def test_unexpected_tensor_is_named(tmp_path: Path, checkpoint: Path) -> None:
    extra = "first_stage_model.encoder.mid.attn_1.extra.weight"

    def add(state):
        state[extra] = torch.zeros(3)

    path = _rewrite(checkpoint, tmp_path / "extra.safetensors", add)
    with pytest.raises(ValueError, match=re.escape(f"unmapped: {extra}")):
        _load(path)


def test_misshaped_tensor_is_named(tmp_path: Path, checkpoint: Path) -> None:
    key = "model.diffusion_model.input_blocks.1.1.proj_out.weight"

    def cut(state):
        state[key] = state[key][:, :16].contiguous()

    path = _rewrite(checkpoint, tmp_path / "cut.safetensors", cut)
    with pytest.raises(ValueError, match=re.escape(f"mis-shaped: {key} is (32, 16)")):
        _load(path)


def test_ckpt_refused_without_allow_pickle(tmp_path: Path, sd_unet, vae) -> None:
    path = tmp_path / "v2-1_512.ckpt"
    write_checkpoint(path, sd_unet, vae, pickle=True)
    with pytest.raises(ValueError, match=r"v2-1_512\.ckpt: a pickle checkpoint.*allow-pickle"):
        _load(path)


def test_ckpt_loads_with_allow_pickle(tmp_path: Path, sd_unet, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v2-1_512.ckpt"
    write_checkpoint(path, sd_unet, vae, pickle=True)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    result = _load(path, allow_pickle=True)
    assert calls == [True]
    assert result.source["format"] == "pickle"
    for name, tensor in sd_unet.state_dict().items():
        assert torch.equal(result.unet.state_dict()[name], tensor), name
    x = _unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(result.unet(**x).sample, sd_unet(**x).sample, atol=1e-5, rtol=1e-5)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        _load(tmp_path / "nowhere.safetensors")
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown format"):
        _load(odd)


def test_training_starts_from_a_single_file_and_its_card_travels(tmp_path: Path, vae) -> None:
    """`pretrained_sd: file.safetensors` starts the SatUNet (and a ControlNet3D from it); the saved pipeline's
    README.md names the file's sha256."""
    from dsat_core.data.synthetic import make_synthetic_store
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.train_controlnet import TrainControlNetConfig, build_base, build_controlnet
    from dsat_core.training.train_diffusionsat import train

    torch.manual_seed(0)  # 64-channel heads, as SD 2.x: widths 64 / 128 → 1 / 2 heads
    unet = UNet2DConditionModel(
        **unet_config("tiny", block_out_channels=(64, 128), attention_head_dim=(1, 2))
    )
    checkpoint = tmp_path / "v2-1_512-small.safetensors"
    write_checkpoint(checkpoint, unet, vae)
    store = make_synthetic_store(str(tmp_path / "store.zarr"), n_scenes=1, tiles_per_scene=4, size=16)
    common = dict(store_uri=store, pretrained_sd=str(checkpoint), text_encoder="hash", resolution=16,
                  train_batch_size=2, use_mlflow=False, lr_warmup_steps=0)  # fmt: skip
    result = train(TrainConfig(output_dir=str(tmp_path / "unet"), max_steps=1, **common))
    card = (Path(result.pipeline_dir) / "README.md").read_text()
    assert sha256_file(checkpoint) in card and "Open RAIL++-M" in card
    config = TrainControlNetConfig(
        task="sr", output_dir=str(tmp_path / "cn"), product="rgb", cond_product="rgb", **common
    )
    parts = build_base(config)
    controlnet = build_controlnet(config, parts.unet, parts.vae, channels=3)
    assert parts.model_card == card and tuple(controlnet.config.block_out_channels) == (64, 128)
