"""Tiny checkpoints in the DiffusionSat reference code's released layouts, written by tests.

Built from diffusers parts and the reference's tensor names (facts of its layout, see
`dsat_core.models.reference_layout`), never from this project's models, so a converter that renames or
reshapes a tensor wrongly cannot agree with them by construction. Every tensor is random and non-zero
(zero-initialised layers would hide a wrong mapping).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from dsat_core.models.configs import unet_config
from dsat_core.models.vae import tiny_vae_config

MAX_LENGTH = 16
WORDS = ["a", "satellite", "image", "of", "farm", "port", "city", "in", "greece"]
NUM_METADATA = 7
UNET = unet_config("tiny", sample_size=8)  # block_out (32, 64), 1 layer per block, head dim 8
TIME_DIM = UNET["block_out_channels"][0]
TIME_EMBED_DIM = 4 * TIME_DIM
# residuals of the tiny UNet: conv_in, block 0's layer, block 0's downsampler, block 1's layer
RESIDUAL_CHANNELS = (32, 32, 32, 64)
TEMPORAL_POSITIONS = (0, 2)  # after conv_in and after the downsampler
TEMPORAL_HEADS = {0: (8, 64), 2: (32 // 8, 8)}  # position 0: 8 × 64; then width // head dim heads


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer: single letters, letters ending a word, and whole-word merges for WORDS."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            piece = char + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current += piece
            if current not in vocab:
                vocab.append(current)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH})
    )


def tiny_clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=UNET["cross_attention_dim"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
    )


def _randomise(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every float tensor replaced by small random values (norm weights around 1)."""
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator) * 0.05
        out[name] = (noise + 1.0) if name.endswith("weight") and tensor.ndim == 1 else noise
    return out


def _save(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], fmt: str) -> None:
    """config.json + weights as the reference saved them (.bin, pickle) or the hub copy (.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "bin":
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def metadata_mlp_state(
    generator: torch.Generator, prefix: str = "metadata_embedding"
) -> dict[str, torch.Tensor]:
    """The reference's per-field MLPs ``metadata_embedding.{i}.linear_{1,2}`` (32 → 128 → 128)."""
    state = {}
    for i in range(NUM_METADATA):
        mlp = TimestepEmbedding(TIME_DIM, TIME_EMBED_DIM)
        for name, tensor in _randomise(mlp.state_dict(), generator).items():
            state[f"{prefix}.{i}.{name}"] = tensor
    return state


def reference_unet_config() -> dict[str, Any]:
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}
    return {
        "_class_name": "SatUNet",
        "_diffusers_version": "0.17.0.dev0",
        **config,
        "dual_cross_attention": False,  # a key of the old diffusers the project's UNet no longer takes
        "use_metadata": True,
        "num_metadata": NUM_METADATA,
    }


def reference_unet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = _randomise(UNet2DConditionModel(**UNET).state_dict(), generator)
    return {**state, **metadata_mlp_state(generator)}


def write_reference_unet(folder: Path, fmt: str = "bin", seed: int = 0) -> dict[str, torch.Tensor]:
    state = reference_unet_state(seed)
    _save(folder, reference_unet_config(), state, fmt)
    return state


def legacy_vae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny AutoencoderKL's tensors under diffusers 0.17's names (query/key/value/proj_attn)."""
    generator = torch.Generator().manual_seed(seed + 100)
    state = _randomise(AutoencoderKL(**tiny_vae_config(2)).state_dict(), generator)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for name, tensor in state.items():
        for new, old in renames.items():
            name = name.replace(new, old)
        out[name] = tensor
    return out


def write_reference_pipeline(
    root: Path, fmt: str = "bin", step: int = 150
) -> dict[str, dict[str, torch.Tensor]]:
    """The single-image release: model_index.json, checkpoint-<step>/unet, vae, text encoder, scheduler."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiffusionSatPipeline",
                "_diffusers_version": "0.17.0.dev0",
                "unet": ["diffusionsat", "SatUNet"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    states = {"unet": write_reference_unet(root / f"checkpoint-{step}" / "unet", fmt)}
    vae_config = {
        "_class_name": "AutoencoderKL",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in tiny_vae_config(2).items()},
    }
    states["vae"] = legacy_vae_state()
    _save(root / "vae", vae_config, states["vae"], fmt)
    torch.manual_seed(3)
    clip = CLIPTextModel(tiny_clip_config())
    clip.save_pretrained(root / "text_encoder")
    states["text_encoder"] = {k: v.clone() for k, v in clip.state_dict().items()}
    write_tokenizer(root / "tokenizer")
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    ).save_pretrained(root / "scheduler")
    return states


# ---------------------------------------------------------------------------------------------- ControlNets
def _encoder_config() -> dict[str, Any]:
    keys = (
        "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "block_out_channels",
        "layers_per_block", "act_fn", "norm_num_groups", "cross_attention_dim", "attention_head_dim",
    )  # fmt: skip
    return {k: list(UNET[k]) if isinstance(UNET[k], tuple) else UNET[k] for k in keys}


def _encoder_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """conv_in, time_embedding, down_blocks, mid_block of the tiny UNet (the ControlNet's encoder copy)."""
    parts = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    state = UNet2DConditionModel(**UNET).state_dict()
    return _randomise({k: v for k, v in state.items() if k.startswith(parts)}, generator)


def _cond_embedding_state(
    generator: torch.Generator, channels: tuple[int, ...], in_channels: int, two_d: bool
) -> dict[str, torch.Tensor]:
    """``controlnet_cond_embedding``: conv_in, blocks (pairs of 3x3 / strided convs), conv_out (k 3)."""
    k3 = (3, 3) if two_d else (3, 3, 3)
    k133 = (3, 3) if two_d else (1, 3, 3)
    shapes = {"conv_in": (channels[0], in_channels, *k3)}
    for i in range(len(channels) - 1):
        shapes[f"blocks.{2 * i}"] = (channels[i], channels[i], *k3)
        shapes[f"blocks.{2 * i + 1}"] = (channels[i + 1], channels[i], *k133)
    shapes["conv_out"] = (TIME_DIM, channels[-1], *k3)
    state = {}
    for name, shape in shapes.items():
        state[f"controlnet_cond_embedding.{name}.weight"] = torch.randn(shape, generator=generator) * 0.05
        state[f"controlnet_cond_embedding.{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.05
    return state


def _zero_convs_state(generator: torch.Generator, two_d: bool) -> dict[str, torch.Tensor]:
    tail = (1, 1) if two_d else (1, 1, 1)
    state = {}
    for i, width in enumerate(RESIDUAL_CHANNELS):
        state[f"controlnet_down_blocks.{i}.weight"] = (
            torch.randn(width, width, *tail, generator=generator) * 0.1
        )
        state[f"controlnet_down_blocks.{i}.bias"] = torch.randn(width, generator=generator) * 0.1
    mid = UNET["block_out_channels"][-1]
    state["controlnet_mid_block.weight"] = torch.randn(mid, mid, *tail, generator=generator) * 0.1
    state["controlnet_mid_block.bias"] = torch.randn(mid, generator=generator) * 0.1
    return state


def temporal_block(position: int) -> TransformerTemporalModel:
    heads, head_dim = TEMPORAL_HEADS[position]
    return TransformerTemporalModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=RESIDUAL_CHANNELS[position],
        num_layers=1,
    )


def _temporal_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for pos in TEMPORAL_POSITIONS:
        for name, tensor in _randomise(temporal_block(pos).state_dict(), generator).items():
            state[f"temporal_blocks.{pos}.{name}"] = tensor
    for i in range(len(RESIDUAL_CHANNELS)):  # learned gates where a layer is; frozen zeros elsewhere
        state[f"mixing_attns.{i}"] = torch.tensor(0.3 + 0.2 * i if i in TEMPORAL_POSITIONS else 0.0)
    return state


def reference_controlnet3d_config(
    in_channels: int = 3, channels: tuple[int, ...] = (8, 16)
) -> dict[str, Any]:
    return {
        "_class_name": "ControlNetModel3D",
        "_diffusers_version": "0.17.0.dev0",
        **_encoder_config(),
        "controlnet_conditioning_channel_order": "rgb",
        "conditioning_embedding_out_channels": list(channels),
        "global_pool_conditions": False,
        "conditioning_in_channels": in_channels,
        "use_temporal_transformer": True,
        "use_metadata": True,
        "num_metadata": NUM_METADATA,
    }


def write_reference_controlnet3d(
    folder: Path, fmt: str = "bin", in_channels: int = 3, seed: int = 1
) -> dict[str, torch.Tensor]:
    """The Texas SR 3D ControlNet layout (VAE factor 2: embedder channels (8, 16), one stride-2 stage)."""
    generator = torch.Generator().manual_seed(seed)
    config = reference_controlnet3d_config(in_channels)
    state = {
        **_encoder_state(generator),
        **metadata_mlp_state(generator),
        **_cond_embedding_state(
            generator, tuple(config["conditioning_embedding_out_channels"]), in_channels, False
        ),
        **_zero_convs_state(generator, False),
        **_temporal_state(generator),
    }
    _save(folder, config, state, fmt)
    return state


def reference_controlnet2d_config(
    in_channels: int = 10, channels: tuple[int, ...] = (8, 16), scale: int = 8
) -> dict[str, Any]:
    config = reference_controlnet3d_config(in_channels, channels)
    config.pop("use_temporal_transformer")
    return {**config, "_class_name": "ControlNetModel", "conditioning_scale": scale}


def write_reference_controlnet2d(
    folder: Path, fmt: str = "bin", in_channels: int = 10, scale: int = 8, seed: int = 2
) -> dict[str, torch.Tensor]:
    """The fMoW-Sentinel SR 2D ControlNet layout. With VAE factor 2, ``scale=8`` gives no stride-2 stage:
    the condition comes at half the target's size (as 256 px for a 512 px target in the release)."""
    generator = torch.Generator().manual_seed(seed)
    config = reference_controlnet2d_config(in_channels, scale=scale)
    state = {
        **_encoder_state(generator),
        **metadata_mlp_state(generator),
        **_cond_embedding_state(
            generator, tuple(config["conditioning_embedding_out_channels"]), in_channels, True
        ),
        **_zero_convs_state(generator, True),
    }
    _save(folder, config, state, fmt)
    return state


def write_controlnet_release(root: Path, kind: str, fmt: str = "bin") -> dict[str, torch.Tensor]:
    """A ControlNet release folder: model_index.json + controlnet/ (the base UNet comes separately)."""
    root.mkdir(parents=True, exist_ok=True)
    class_name = "ControlNetModel3D" if kind == "3d" else "ControlNetModel"
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "DiffusionSatControlNetPipeline", "controlnet": ["diffusionsat", class_name]}
        )
    )
    if kind == "3d":
        return write_reference_controlnet3d(root / "controlnet", fmt)
    return write_reference_controlnet2d(root / "controlnet", fmt)
