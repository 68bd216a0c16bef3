"""Load a Stable Diffusion 2.1 single-file checkpoint (original LDM/CompVis layout) into a `SatUNet`.

The file holds ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.model.*`` (OpenCLIP) tensors. Nothing is fetched from a model hub: the UNet and VAE
configs are derived from the tensors' shapes, and the names are mapped here (no diffusers
``from_single_file``). Every UNet / VAE tensor must map onto exactly one model tensor of the same shape;
anything else is an error naming the tensor.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from torch import nn

from .configs import scheduler_config
from .sat_unet import SatUNet
from .weights_io import read_state_dict, sha256_file

Variant = Literal["base", "768-v"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SD21_LICENSE = "CreativeML Open RAIL++-M (Stable Diffusion 2.1)"
TEXT_NOT_LOADED = "not loaded (text encoder comes from --text-encoder)"
OTHER_NOT_LOADED = "not loaded (not a UNet / VAE tensor: noise-schedule buffers, EMA copies, ...)"
SCHEDULE_NOT_LOADED = "not loaded (the noise schedule comes from scheduler_config)"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD2_HEAD_CHANNELS = 64  # SD 2.x fixes channels per attention head (num_head_channels: 64), not heads

_PREDICTION_TYPE: dict[str, str] = {"base": "epsilon", "768-v": "v_prediction"}
_LATENT_SIZE: dict[str, int] = {"base": 64, "768-v": 96}
_VARIANT_FILENAME_HINT = "768"
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
_UNET_TOP |= {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_VAE_TOP = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"} | {
    f"{part}.{old}": f"{part}.{new}"
    for part in ("encoder", "decoder")
    for old, new in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out"))
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_RESNET |= {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_PARAM = r"(weight|bias)"


@dataclass
class SingleFileSD:
    """What `load_sd_single_file` gives: the SatUNet, the VAE (None if the file has none), the noise
    schedule and a JSON-serialisable record of the file (for `model_card`)."""

    unet: SatUNet
    vae: AutoencoderKL | None
    scheduler_config: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)


def infer_variant(path: str | os.PathLike, variant: Variant | None = None) -> tuple[Variant, str]:
    """The variant and the rule that chose it.

    768-v and base cannot be told apart from the UNet weights (same shapes), so: `variant` if given, else
    "768-v" when the file name contains "768" (e.g. ``v2-1_768-ema-pruned.safetensors``), else "base".
    """
    if variant is not None:
        if variant not in _PREDICTION_TYPE:
            raise ValueError(f"unknown SD 2.1 variant {variant!r}; choose one of {sorted(_PREDICTION_TYPE)}")
        return variant, "given"
    if _VARIANT_FILENAME_HINT in Path(path).name:
        return "768-v", f"file name contains {_VARIANT_FILENAME_HINT!r}"
    return "base", f"default (file name lacks {_VARIANT_FILENAME_HINT!r}; the weights cannot tell)"


def _wanted(key: str) -> bool:
    return key.startswith((UNET_PREFIX, VAE_PREFIX)) or key == "betas"


def read_checkpoint(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], Counter[str], str]:
    """(UNet / VAE / ``betas`` tensors, key count per not-loaded group, format) of a checkpoint file.

    ``.safetensors`` tensors outside those prefixes are counted, not read. Pickle files (``.ckpt``, ...) are
    refused unless `allow_pickle`, then read with ``torch.load(weights_only=True)`` (state under
    "state_dict" when present).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return *_read_safetensors(file), "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return *_read_pickle(file, allow_pickle), "pickle"
    raise ValueError(
        f"checkpoint {file}: unknown format {suffix!r} (expected .safetensors or {PICKLE_SUFFIXES})"
    )


def _group(key: str) -> str:
    return TEXT_PREFIX.rstrip(".") if key.startswith(TEXT_PREFIX) else key.split(".", 1)[0]


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], Counter[str]]:
    tensors: dict[str, torch.Tensor] = {}
    skipped: Counter[str] = Counter()
    try:
        with safe_open(file, framework="pt") as handle:
            names = handle.keys()  # a list, not a dict view
            for key in names:
                if _wanted(key):
                    tensors[key] = handle.get_tensor(key)
                else:
                    skipped[_group(key)] += 1
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise ValueError(
            f"checkpoint {file} is not a readable .safetensors file (truncated or corrupt?): {err}"
        ) from err
    return tensors, skipped


def _read_pickle(file: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Counter[str]]:
    state = read_state_dict(file, allow_pickle=allow_pickle)  # refuses pickle unless allowed
    tensors = {key: value for key, value in state.items() if _wanted(key)}
    skipped = Counter(_group(key) for key in state if not _wanted(key))
    return tensors, skipped


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with `prefix`, the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------
# UNet: names and config
# --------------------------------------------------------------------------------------------------------
def _resnet_name(rest: str, table: Mapping[str, str]) -> str | None:
    match = re.fullmatch(rf"(.+)\.{_PARAM}", rest)
    if match is None or match[1] not in table:
        return None
    return f"{table[match[1]]}.{match[2]}"


def _with_tail(diffusers_module: str, tail: str | None) -> str | None:
    return None if tail is None else f"{diffusers_module}.{tail}"


def _unet_resnet(module: str, rest: str) -> str | None:
    return _with_tail(module, _resnet_name(rest, _UNET_RESNET))


def ldm_unet_key(key: str, layers_per_block: int) -> str | None:
    """diffusers name of an LDM UNet tensor (``model.diffusion_model.`` removed); None if it has none.

    ``input_blocks.{i}``: i = 0 is conv_in, then per down block `layers_per_block` (ResBlock, transformer)
    pairs and a downsampler (``.0.op``, all but the last block). ``middle_block.{0,1,2}``: resnet,
    transformer, resnet. ``output_blocks.{i}``: per up block ``layers_per_block + 1`` (ResBlock, transformer,
    upsampler ``conv``) groups. Transformer internals share diffusers' names.
    """
    for old, new in _UNET_TOP.items():
        if (match := re.fullmatch(rf"{re.escape(old)}\.{_PARAM}", key)) is not None:
            return f"{new}.{match[1]}"
    if (match := re.fullmatch(r"middle_block\.([012])\.(.+)", key)) is not None:
        child, rest = int(match[1]), match[2]
        if child == 1:
            return f"mid_block.attentions.0.{rest}"
        return _unet_resnet(f"mid_block.resnets.{child // 2}", rest)
    if (match := re.fullmatch(r"input_blocks\.([1-9]\d*)\.([01])\.(.+)", key)) is not None:
        block, layer = divmod(int(match[1]) - 1, layers_per_block + 1)
        child, rest = int(match[2]), match[3]
        if layer == layers_per_block:
            op = re.fullmatch(rf"op\.{_PARAM}", rest)
            return f"down_blocks.{block}.downsamplers.0.conv.{op[1]}" if child == 0 and op else None
        if child == 0:
            return _unet_resnet(f"down_blocks.{block}.resnets.{layer}", rest)
        return f"down_blocks.{block}.attentions.{layer}.{rest}"
    if (match := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key)) is not None:
        block, layer = divmod(int(match[1]), layers_per_block + 1)
        child, rest = int(match[2]), match[3]
        if child == 0:
            return _unet_resnet(f"up_blocks.{block}.resnets.{layer}", rest)
        if (conv := re.fullmatch(rf"conv\.{_PARAM}", rest)) is not None:
            return f"up_blocks.{block}.upsamplers.0.conv.{conv[1]}"
        return f"up_blocks.{block}.attentions.{layer}.{rest}" if child == 1 else None
    return None


def _shape(state: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{what} checkpoint lacks tensor {key!r}; is it an SD 2.x (LDM layout) file?")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m[1]) for key in state if (m := re.match(pattern, key))})


def _transformer_depth(state: Mapping[str, torch.Tensor], module: str) -> int:
    return len(_indices(state, rf"{re.escape(module)}\.transformer_blocks\.(\d+)\."))


def ldm_unet_config(
    state: Mapping[str, torch.Tensor], *, head_channels: int | None = SD2_HEAD_CHANNELS, sample_size: int = 64
) -> dict[str, Any]:
    """`UNet2DConditionModel` config of an LDM UNet state dict (prefix removed), read off its shapes.

    From the shapes: in/out channels, block widths, layers per block, which blocks have transformers (and
    their depth), cross_attention_dim (``attn2.to_k``), linear vs conv ``proj_in``, conv kernels. Not in the
    weights: the head count, taken as SD 2.x does, width // `head_channels` per block (SD 2.1: 5/10/20/20,
    stored as diffusers' ``attention_head_dim``; `head_channels` None leaves it to the caller), and norm
    groups (32).
    """
    what = "UNet"
    conv_in = _shape(state, "input_blocks.0.0.weight", what)
    last_input = max(_indices(state, r"input_blocks\.(\d+)\."))
    downsamplers = [i for i in range(1, last_input + 1) if f"input_blocks.{i}.0.op.weight" in state]
    layers = downsamplers[0] - 1 if downsamplers else last_input
    num_blocks, remainder = divmod(last_input + 1, layers + 1)
    if layers < 1 or remainder or len(downsamplers) != num_blocks - 1:
        raise ValueError(
            f"UNet checkpoint: input_blocks 1..{last_input} with downsamplers at {downsamplers} "
            "do not form an SD-style encoder"
        )
    firsts = [1 + b * (layers + 1) for b in range(num_blocks)]
    widths = tuple(_shape(state, f"input_blocks.{i}.0.out_layers.3.weight", what)[0] for i in firsts)
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in state for i in firsts]
    up_attn = [f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in state for b in range(num_blocks)]
    if "middle_block.1.proj_in.weight" not in state:
        raise ValueError(
            "UNet checkpoint: middle_block.1 is not a transformer; only SD-style mid blocks load"
        )
    depths = [_transformer_depth(state, f"input_blocks.{i}.1") or 1 for i in firsts]
    to_k = next((k for k in state if k.endswith(".attn2.to_k.weight")), None)
    if to_k is None:
        raise ValueError("UNet checkpoint has no cross-attention (attn2.to_k) tensor")
    proj_in = _shape(state, "middle_block.1.proj_in.weight", what)
    config = {
        "sample_size": sample_size,
        "in_channels": conv_in[1],
        "out_channels": _shape(state, "out.2.weight", what)[0],
        "conv_in_kernel": conv_in[-1],
        "conv_out_kernel": _shape(state, "out.2.weight", what)[-1],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": layers,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else tuple(depths),
        "cross_attention_dim": _shape(state, to_k, what)[1],
        "use_linear_projection": len(proj_in) == 2,
        "norm_num_groups": 32,
    }
    if head_channels is not None:
        config["attention_head_dim"] = _heads(widths, down_attn, head_channels)
    return config


def _heads(widths: tuple[int, ...], attention: list[bool], head_channels: int) -> tuple[int, ...]:
    """width // head_channels per block; attention blocks and the last (mid block) must divide exactly."""
    heads = []
    for i, width in enumerate(widths):
        if (attention[i] or i == len(widths) - 1) and (width < head_channels or width % head_channels):
            raise ValueError(
                f"UNet block {i} width {width} is not a multiple of {head_channels} channels per head; pass "
                "head_channels=... or unet_overrides={'attention_head_dim': ...}"
            )
        heads.append(max(width // head_channels, 1))
    return tuple(heads)


# --------------------------------------------------------------------------------------------------------
# VAE: names and config
# --------------------------------------------------------------------------------------------------------
def ldm_vae_key(key: str, num_blocks: int) -> str | None:
    """diffusers name of an LDM VAE tensor (``first_stage_model.`` removed); None if it has none.

    ``decoder.up.{i}`` counts from the lowest resolution up, so it becomes ``up_blocks.{num_blocks-1-i}``.
    """
    for old, new in _VAE_TOP.items():
        if (match := re.fullmatch(rf"{re.escape(old)}\.{_PARAM}", key)) is not None:
            return f"{new}.{match[1]}"
    if (match := re.fullmatch(r"(encoder|decoder)\.(.+)", key)) is None:
        return None
    part, rest = match[1], match[2]
    if (m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest)) is not None:
        return _with_tail(f"{part}.mid_block.resnets.{int(m[1]) - 1}", _resnet_name(m[2], _VAE_RESNET))
    if (m := re.fullmatch(r"mid\.attn_1\.(.+)", rest)) is not None:
        return _with_tail(f"{part}.mid_block.attentions.0", _resnet_name(m[1], _VAE_ATTENTION))
    level = r"down" if part == "encoder" else r"up"
    if (m := re.fullmatch(rf"{level}\.(\d+)\.(.+)", rest)) is None:
        return None
    index = int(m[1]) if part == "encoder" else num_blocks - 1 - int(m[1])
    if not 0 <= index < num_blocks:
        return None
    module = f"{part}.{level}_blocks.{index}"
    if (r := re.fullmatch(r"block\.(\d+)\.(.+)", m[2])) is not None:
        return _with_tail(f"{module}.resnets.{r[1]}", _resnet_name(r[2], _VAE_RESNET))
    sampler = "downsample" if part == "encoder" else "upsample"
    if (s := re.fullmatch(rf"{sampler}\.conv\.{_PARAM}", m[2])) is not None:
        return f"{module}.{sampler}rs.0.conv.{s[1]}"
    return None


def ldm_vae_config(state: Mapping[str, torch.Tensor], *, sample_size: int = 512) -> dict[str, Any]:
    """`AutoencoderKL` config of an LDM VAE state dict (prefix removed), read off its shapes.

    Not in the weights: norm groups (32) and SD's latent scaling factor 0.18215.
    """
    what = "VAE"
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError("VAE checkpoint has no encoder.down.* tensors")
    layers = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    widths = tuple(_shape(state, f"encoder.down.{i}.block.0.conv1.weight", what)[0] for i in levels)
    return {
        "in_channels": _shape(state, "encoder.conv_in.weight", what)[1],
        "out_channels": _shape(state, "decoder.conv_out.weight", what)[0],
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": _shape(state, "decoder.conv_in.weight", what)[1],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
    }


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
def _listed(keys: list[str], limit: int = 10) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_state_dict(
    state: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    expected: Mapping[str, tuple[int, ...]],
    prefix: str,
    where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """`state` (keys without `prefix`) under diffusers names.

    ValueError (starting with `where`, naming the tensors with `prefix`) for every unmapped, doubly mapped,
    unexpected, mis-shaped or missing tensor. `expected`: the model's diffusers name → shape. (C, C, 1, 1)
    tensors where (C, C) is expected (LDM VAE attention's 1×1 convs) become linear weights.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped, duplicate, unexpected, misshaped = [], [], [], []
    for key, tensor in state.items():
        name = rename(key)
        if name is None:
            unmapped.append(prefix + key)
            continue
        if name in origin:
            duplicate.append(f"{prefix}{key} and {prefix}{origin[name]} → {name}")
            continue
        if name not in expected:
            unexpected.append(f"{prefix}{key} (→ {name})")
            continue
        want = expected[name]
        if tuple(tensor.shape) != want and len(want) == 2 and tuple(tensor.shape) == (*want, 1, 1):
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != want:
            misshaped.append(f"{prefix}{key} is {tuple(tensor.shape)}, {name} needs {want}")
            continue
        mapped[name], origin[name] = tensor, key
    missing = [name for name in expected if name not in origin]
    problems = {
        "unmapped": unmapped,
        "mapped twice": duplicate,
        "not in the model": unexpected,
        "mis-shaped": misshaped,
        "missing": missing,
    }
    if any(problems.values()):
        text = "; ".join(f"{what}: {_listed(keys)}" for what, keys in problems.items() if keys)
        raise ValueError(f"{where}: {prefix}* tensors do not fit the model derived from their shapes: {text}")
    return mapped


def _build(cls: type[nn.Module], config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """`cls(**config)` holding `state` (built on the meta device, so no memory for random weights)."""
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{cls.__name__}: tensors left unloaded: {_listed(left)}")
    return model.eval()


def _meta_shapes(cls: type[nn.Module], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in cls(**config).state_dict().items()}


def _load_module(
    cls: type[nn.Module],
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    prefix: str,
    where: str,
    dtype: torch.dtype,
) -> nn.Module:
    mapped = map_state_dict(state, rename, _meta_shapes(cls, config), prefix, where)
    return _build(cls, config, {k: v.to(dtype).contiguous() for k, v in mapped.items()})


def _betas_match(betas: torch.Tensor | None, config: Mapping[str, Any]) -> bool | None:
    """Whether the file's ``betas`` buffer is the scaled_linear schedule of `config` (None: no buffer)."""
    if betas is None:
        return None
    steps = config["num_train_timesteps"]
    expected = torch.linspace(math.sqrt(config["beta_start"]), math.sqrt(config["beta_end"]), steps) ** 2
    return bool(betas.shape == (steps,) and torch.allclose(betas.double(), expected.double(), atol=1e-6))


def _not_loaded(skipped: Counter[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for group, count in sorted(skipped.items()):
        reason = {TEXT_PREFIX.rstrip("."): TEXT_NOT_LOADED, "betas": SCHEDULE_NOT_LOADED}.get(
            group, OTHER_NOT_LOADED
        )
        yield group, {"tensors": count, "reason": reason}


def load_sd_single_file(
    path: str | os.PathLike,
    *,
    variant: Variant | None = None,
    sample_size: int | None = None,
    head_channels: int = SD2_HEAD_CHANNELS,
    unet_overrides: Mapping[str, Any] | None = None,
    vae_overrides: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> SingleFileSD:
    """A `SatUNet` (metadata path zero-initialised) and VAE from an SD 2.x single-file checkpoint.

    Args:
        path: ``.safetensors`` (or, with `allow_pickle`, ``.ckpt``) in the LDM layout.
        variant: "base" (512 px, epsilon) or "768-v" (768 px, v-prediction). None: "768-v" when the file
            name contains "768", else "base" (the weights look the same; see `infer_variant`).
        sample_size: latent side of the UNet config (None: 64 for base, 96 for 768-v).
        head_channels: channels per attention head; heads per block = width // head_channels (SD 2.x: 64).
        unet_overrides / vae_overrides: replace keys of the derived configs (e.g. ``attention_head_dim``).
        torch_dtype: dtype of the loaded weights (the metadata embedding stays float32).
        allow_pickle: read pickle checkpoints, with ``torch.load(weights_only=True)``.

    The 768-v UNet gets ``upcast_attention=True`` (as diffusers' SD 2.1 768 config; numerics only).
    ``cond_stage_model.*`` (OpenCLIP) and other tensors are counted in ``source["not_loaded"]``.
    """
    file = Path(path)
    variant, variant_rule = infer_variant(file, variant)
    tensors, skipped, fmt = read_checkpoint(file, allow_pickle=allow_pickle)
    unet_state = strip_prefix(tensors, UNET_PREFIX)
    vae_state = strip_prefix(tensors, VAE_PREFIX)
    if not unet_state:
        raise ValueError(f"checkpoint {file} has no {UNET_PREFIX}* tensors (not an LDM-layout SD file?)")
    schedule = scheduler_config(_PREDICTION_TYPE[variant])
    latent = sample_size or _LATENT_SIZE[variant]

    heads_given = "attention_head_dim" in (unet_overrides or {})
    heads_rule = (
        "attention_head_dim from unet_overrides" if heads_given else f"heads = width // {head_channels}"
    )
    unet_config = ldm_unet_config(
        unet_state, head_channels=None if heads_given else head_channels, sample_size=latent
    )
    unet_config["upcast_attention"] = variant == "768-v"
    unet_config.update(unet_overrides or {})
    layers = unet_config["layers_per_block"]
    sd_unet = _load_module(
        UNet2DConditionModel,
        unet_config,
        unet_state,
        lambda key: ldm_unet_key(key, layers),
        UNET_PREFIX,
        str(file),
        torch_dtype,
    )
    unet = SatUNet.from_sd_unet(sd_unet)
    del sd_unet

    vae = None
    if vae_state:
        vae_config = ldm_vae_config(vae_state)
        vae_config["sample_size"] = latent * 2 ** (len(vae_config["block_out_channels"]) - 1)
        vae_config.update(vae_overrides or {})
        blocks = len(vae_config["block_out_channels"])
        vae = _load_module(
            AutoencoderKL,
            vae_config,
            vae_state,
            lambda key: ldm_vae_key(key, blocks),
            VAE_PREFIX,
            str(file),
            torch_dtype,
        )

    other = skipped + Counter({"betas": int("betas" in tensors)})
    source = {
        "path": str(file.resolve()),
        "sha256": sha256_file(file),
        "size_bytes": file.stat().st_size,
        "format": fmt,
        "variant": variant,
        "variant_rule": variant_rule,
        "prediction_type": schedule["prediction_type"],
        "tensors": {
            "unet": len(unet_state),
            "vae": len(vae_state),
            "cond_stage_model": other[TEXT_PREFIX.rstrip(".")],
            "not_loaded": other.total(),
            "total": len(unet_state) + len(vae_state) + other.total(),
        },
        "not_loaded": dict(_not_loaded(other)),
        "unet_config_rule": f"derived from tensor shapes; {heads_rule}",
        "betas_match_scheduler": _betas_match(tensors.get("betas"), schedule),
        "license": SD21_LICENSE,
    }
    return SingleFileSD(unet=unet, vae=vae, scheduler_config=schedule, source=source)


def model_card(source: Mapping[str, Any]) -> str:
    """Markdown README for a model folder made from a single-file checkpoint (`SingleFileSD.source`)."""
    tensors = source.get("tensors", {})
    rule = source.get("variant_rule", "given")
    lines = [
        "---",
        "license: openrail++",
        "tags: [diffusionsat, stable-diffusion-2-1]",
        "---",
        "",
        "# DiffusionSat UNet from a Stable Diffusion 2.1 checkpoint",
        "",
        f"- Source file: `{source['path']}`",
        f"- SHA-256: `{source['sha256']}`",
        f"- Variant: {source['variant']} ({source.get('prediction_type', '?')}; rule: {rule})",
        f"- Tensors loaded: UNet {tensors.get('unet', '?')}, VAE {tensors.get('vae', '?')}",
    ]
    for group, info in source.get("not_loaded", {}).items():
        lines.append(f"- `{group}`: {info['tensors']} tensor(s) {info['reason']}")
    lines += [
        f"- UNet config: {source.get('unet_config_rule', 'derived from tensor shapes')}",
        f"- Licence: {SD21_LICENSE}; its use restrictions apply to this model and its outputs.",
        "",
        "The metadata embedding is new and starts at zero (the UNet then predicts exactly as the source).",
        "",
    ]
    return "\n".join(lines)
