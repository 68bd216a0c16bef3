"""The DiffusionSat reference code's model layout: name tables and config translation, both directions.

The authors' released checkpoints (a `SatUNet`, a 3D `ControlNetModel3D`, a 2D `ControlNetModel`) name and
shape some tensors differently from this project's models, and compute a few things differently. This
module maps every tensor by a table of name templates (`NameRule`), checks every shape against the model
it fills, and translates the configs so that a converted model records the reference's semantics as model
options (`missing_metadata="zero"`, `temporal_mixing="after_zero_conv"`, `frame_reduction="sum"`,
`conditioning_range=(0, 1)`, per-position temporal heads, a shared metadata embedding, the 2D embedder as
a temporal-kernel-1 one). An unmapped, missing or mis-shaped tensor is a `LayoutError` naming it.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .controlnet3d import ControlNet3D, default_temporal_layers, residual_layout
from .sat_unet import SatUNet

Reshape = Literal["same", "conv2d_to_3d"]
CONTROLNET_3D = "ControlNetModel3D"
CONTROLNET_2D = "ControlNetModel"
UNET_CLASSES = ("SatUNet", "UNet2DConditionModel")
CONTROLNET_CLASSES = (CONTROLNET_3D, CONTROLNET_2D)
# the reference's 3D temporal layer after conv_in: 8 heads of 64
FIRST_TEMPORAL_HEADS = (8, 64)


class LayoutError(ValueError):
    """Weights or a config that do not fit the layout they claim; the message names the tensor or key."""


@dataclass(frozen=True)
class NameRule:
    """``reference`` ↔ ``project`` name templates; ``{rest}`` matches dotted tails, other fields one part.

    ``optional``: when the project model has no tensor of that name, the reference tensor must be all zeros
    (a parameter the reference keeps but never uses) and is recorded as such.
    """

    reference: str
    project: str
    reshape: Reshape = "same"
    optional: bool = False

    def match(self, name: str, side: Literal["reference", "project"]) -> str | None:
        """The name on the other side, or None when ``name`` does not match this rule's template."""
        source, target = (
            (self.reference, self.project) if side == "reference" else (self.project, self.reference)
        )
        found = re.fullmatch(_template_regex(source), name)
        return None if found is None else target.format(**found.groupdict())


def _template_regex(template: str) -> str:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        if part.startswith("{"):
            key = part[1:-1]
            out.append(f"(?P<{key}>.+)" if key == "rest" else f"(?P<{key}>[^.]+)")
        else:
            out.append(re.escape(part))
    return "".join(out)


@dataclass(frozen=True)
class NameTable:
    """Rules tried in order; ``project_only`` names are set to zeros on import and dropped on export."""

    rules: tuple[NameRule, ...]
    project_only: tuple[str, ...] = ()

    def describe(self) -> list[dict[str, Any]]:
        """The table as JSON-able rows (for conversion records and docs)."""
        rows = [
            {"reference": r.reference, "project": r.project, "reshape": r.reshape, "optional": r.optional}
            for r in self.rules
        ]
        return rows + [{"reference": None, "project": name, "init": "zeros"} for name in self.project_only]


def _identity(*parts: str) -> tuple[NameRule, ...]:
    return tuple(NameRule(f"{p}.{{rest}}", f"{p}.{{rest}}") for p in parts)


METADATA_RULE = NameRule(
    "metadata_embedding.{i}.{layer}.{param}", "metadata_embedding.mlps.{i}.{layer}.{param}"
)
MISSING_EMBEDDING = "metadata_embedding.missing_embedding"

UNET_TABLE = NameTable(
    rules=(
        METADATA_RULE,
        *_identity(
            "conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"
        ),
    ),
    project_only=(MISSING_EMBEDDING,),
)


def controlnet_table(two_d: bool) -> NameTable:
    """ControlNet3D ↔ the reference's `ControlNetModel3D` (or, ``two_d``, its 2D `ControlNetModel`)."""
    conv: Reshape = "conv2d_to_3d" if two_d else "same"
    return NameTable(
        rules=(
            METADATA_RULE,
            NameRule("controlnet_cond_embedding.{rest}", "cond_embedding.{rest}", conv),
            NameRule("controlnet_down_blocks.{i}.{param}", "controlnet_down_blocks.{i}.{param}", conv),
            NameRule("controlnet_mid_block.{param}", "controlnet_mid_block.{param}", conv),
            NameRule("temporal_blocks.{i}.{rest}", "temporal_blocks.{i}.{rest}"),
            NameRule("mixing_attns.{i}", "temporal_gates.{i}", optional=True),
            *_identity("conv_in", "time_embedding", "down_blocks", "mid_block"),
        ),
        project_only=(MISSING_EMBEDDING,),
    )


VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
VAE_TABLE = NameTable(rules=_identity("encoder", "decoder", "quant_conv", "post_quant_conv"))
# diffusers before 0.18 named the VAE's attention projections query/key/value/proj_attn
VAE_LEGACY_TABLE = NameTable(
    rules=(
        *(
            NameRule(
                f"{{side}}.mid_block.attentions.{{i}}.{old}.{{param}}",
                f"{{side}}.mid_block.attentions.{{i}}.{new}.{{param}}",
            )
            for old, new in VAE_LEGACY_ATTENTION.items()
        ),
        *VAE_TABLE.rules,
    )
)


def uses_legacy_vae_names(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".mid_block.attentions." in k and ".query." in k for k in state)


# transformers' CLIP text model: 4.x named its tensors `text_model.*`, 5.x drops the prefix; `position_ids`
# is a buffer older versions saved (checked to be 0..n-1 and regenerated)
TEXT_MODEL_PREFIX = "text_model."
POSITION_IDS = "embeddings.position_ids"


def text_encoder_table(reference_prefixed: bool, project_prefixed: bool) -> NameTable:
    """CLIP text model names between a checkpoint with or without ``text_model.`` and this transformers."""
    ref = TEXT_MODEL_PREFIX if reference_prefixed else ""
    own = TEXT_MODEL_PREFIX if project_prefixed else ""
    return NameTable(rules=(NameRule(f"{ref}{{rest}}", f"{own}{{rest}}"),))


def has_text_model_prefix(names: Iterable[str]) -> bool:
    return any(name.startswith(TEXT_MODEL_PREFIX) for name in names)


@dataclass
class MappedTensor:
    reference: str
    project: str | None
    shape: list[int]
    note: str = ""


@dataclass
class MappingReport:
    """What happened to every tensor of one component."""

    component: str
    tensors: list[MappedTensor] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "count": len(self.tensors),
            "tensors": [vars(t) for t in self.tensors],
        }


def _reshape(tensor: torch.Tensor, how: Reshape, inverse: bool) -> torch.Tensor:
    if how == "same":
        return tensor
    if inverse:
        return tensor.squeeze(2) if tensor.ndim == 5 else tensor
    return tensor.unsqueeze(2) if tensor.ndim == 4 else tensor


def import_state_dict(
    table: NameTable,
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, torch.Size],
    component: str,
) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Map reference tensors ``source`` onto a project model whose state-dict shapes are ``target_shapes``."""
    report = MappingReport(component)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        rule, project = _find_rule(table, name, "reference")
        if rule is None or project is None:
            raise LayoutError(f"{component}: tensor {name} {list(tensor.shape)} is not in the name table")
        if project not in target_shapes:
            if rule.optional and not torch.count_nonzero(tensor):
                report.tensors.append(
                    MappedTensor(name, None, list(tensor.shape), "unused by the reference, zero")
                )
                continue
            raise LayoutError(f"{component}: tensor {name} maps to {project}, which this model does not have")
        value = _reshape(tensor, rule.reshape, inverse=False)
        if tuple(value.shape) != tuple(target_shapes[project]):
            raise LayoutError(
                f"{component}: tensor {name} has shape {list(tensor.shape)}; {project} needs "
                f"{list(target_shapes[project])}"
            )
        if project in out:
            raise LayoutError(f"{component}: two tensors map to {project}")
        out[project] = value
        report.tensors.append(MappedTensor(name, project, list(tensor.shape)))
    for project in target_shapes:
        if project in out:
            continue
        if project not in table.project_only:
            raise LayoutError(f"{component}: the checkpoint has no tensor for {project}")
        out[project] = torch.zeros(target_shapes[project])
        report.tensors.append(MappedTensor("", project, list(target_shapes[project]), "project only, zeros"))
    return out, report


def export_state_dict(
    table: NameTable, state: Mapping[str, torch.Tensor], component: str
) -> dict[str, torch.Tensor]:
    """Project tensors → reference names (``project_only`` tensors are left out)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in table.project_only:
            continue
        rule, reference = _find_rule(table, name, "project")
        if rule is None or reference is None:
            raise LayoutError(f"{component}: tensor {name} has no place in the reference layout")
        out[reference] = _reshape(tensor, rule.reshape, inverse=True).contiguous()
    return out


def _find_rule(
    table: NameTable, name: str, side: Literal["reference", "project"]
) -> tuple[NameRule | None, str | None]:
    for rule in table.rules:
        other = rule.match(name, side)
        if other is not None:
            return rule, other
    return None, None


def model_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- configs
_SATUNET_KEYS = set(inspect.signature(SatUNet.__init__).parameters) - {"self", "kwargs"}
_CONTROLNET_KEYS = set(inspect.signature(ControlNet3D.__init__).parameters) - {"self"}
_REFERENCE_ONLY_UNET_KEYS = ("num_metadata", "use_metadata")


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def satunet_config_from_reference(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A reference UNet config → `SatUNet` kwargs (``missing_metadata="zero"``) and the keys left out."""
    cfg = public_config(config)
    num_metadata = int(cfg.pop("num_metadata", 7))
    use_metadata = bool(cfg.pop("use_metadata", True))
    ignored = sorted(k for k in cfg if k not in _SATUNET_KEYS)
    kwargs = {k: v for k, v in cfg.items() if k in _SATUNET_KEYS}
    kwargs.update(num_metadata_fields=num_metadata, use_metadata=use_metadata, missing_metadata="zero")
    return kwargs, ignored


def satunet_config_to_reference(config: Mapping[str, Any]) -> dict[str, Any]:
    """A `SatUNet` config → the reference's (``num_metadata``; the project's own keys dropped)."""
    _require(config, "unet", {"missing_metadata": "zero"})
    cfg = public_config(config)
    num_metadata = cfg.pop("num_metadata_fields", 7)
    use_metadata = cfg.pop("use_metadata", True)
    cfg.pop("missing_metadata", None)
    return {"_class_name": "SatUNet", **cfg, "use_metadata": use_metadata, "num_metadata": num_metadata}


def _per_block(value: int | Sequence[int], blocks: int) -> list[int]:
    return [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]


def reference_temporal_heads(
    block_out_channels: Sequence[int], layers_per_block: int, attention_head_dim: Any
) -> list[list[int]]:
    """(heads, head dim) at each reference temporal position.

    8 × 64 after conv_in; after block i's downsampler ``width // attention_head_dim[i]`` heads of
    ``attention_head_dim[i]`` (SD 2.1: 64 heads of 5/10/20).
    """
    head_dims = _per_block(attention_head_dim, len(block_out_channels))
    _, after_downsample = residual_layout(block_out_channels, layers_per_block)
    heads = [list(FIRST_TEMPORAL_HEADS)]
    for block, _pos in enumerate(after_downsample):
        width = block_out_channels[block]
        heads.append([width // head_dims[block], head_dims[block]])
    return heads


def stride_stages_2d(conditioning_scale: int, stages: int) -> int:
    """Stride-2 stages of the reference's 2D embedder: stride 2 while its running scale is below 8."""
    count, scale = 0, int(conditioning_scale)
    for _ in range(stages):
        if scale < 8:
            count += 1
        if scale != 8:
            scale *= 2
    return count


def controlnet_config_from_reference(
    config: Mapping[str, Any], class_name: str, vae_scale_factor: int
) -> tuple[dict[str, Any], list[str]]:
    """A reference ControlNet config → `ControlNet3D` kwargs recording the reference's semantics."""
    if class_name not in CONTROLNET_CLASSES:
        raise LayoutError(f"controlnet: class {class_name!r} is none of {CONTROLNET_CLASSES}")
    cfg = public_config(config)
    for key, default in (("controlnet_conditioning_channel_order", "rgb"), ("global_pool_conditions", False)):
        if cfg.get(key, default) != default:
            raise LayoutError(f"controlnet: {key}={cfg[key]!r} is not supported (only {default!r})")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise LayoutError("controlnet: class embeddings are not supported")
    channels = tuple(int(c) for c in cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    two_d = class_name == CONTROLNET_2D
    stages = len(channels) - 1
    stride2 = stride_stages_2d(cfg.get("conditioning_scale", 1), stages) if two_d else stages
    blocks = [int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280))]
    layers = int(cfg.get("layers_per_block", 2))
    temporal = not two_d and bool(cfg.get("use_temporal_transformer", False))
    positions = default_temporal_layers(blocks, layers) if temporal else []
    encoder = {k: v for k, v in cfg.items() if k in _CONTROLNET_KEYS}
    ignored = sorted(
        k
        for k in cfg
        if k not in _CONTROLNET_KEYS
        and k
        not in (
            "conditioning_in_channels",
            "conditioning_embedding_out_channels",
            "conditioning_scale",
            "use_temporal_transformer",
            "num_metadata",
            "use_metadata",
            "controlnet_conditioning_channel_order",
            "global_pool_conditions",
            "class_embed_type",
            "num_class_embeds",
        )
    )
    factor = 2**stride2
    kwargs = {
        **encoder,
        "conditioning_channels": int(cfg.get("conditioning_in_channels", 3)),
        "conditioning_embedding_channels": channels,
        "vae_scale_factor": vae_scale_factor,
        "conditioning_downsample_factor": None if factor == vae_scale_factor else factor,
        "temporal_layers": positions,
        "temporal_attention_heads": (
            reference_temporal_heads(blocks, layers, cfg.get("attention_head_dim", 8)) if temporal else None
        ),
        "conditioning_temporal_kernel": 1 if two_d else 3,
        "use_metadata": bool(cfg.get("use_metadata", True)),
        "num_metadata_fields": int(cfg.get("num_metadata", 7)),
        **REFERENCE_CONTROLNET_OPTIONS,
    }
    return kwargs, ignored


# what a converted ControlNet records; export requires the same
REFERENCE_CONTROLNET_OPTIONS: dict[str, Any] = {
    "missing_metadata": "zero",
    "temporal_mixing": "after_zero_conv",
    "frame_reduction": "sum",
    "conditioning_range": (0.0, 1.0),
    "share_cond_metadata_embedding": True,
}


def _as_tuple(value: Any) -> Any:
    """A JSON list as a tuple (configs compare with tuples), anything else unchanged."""
    return tuple(value) if isinstance(value, list) else value


def _require(config: Mapping[str, Any], component: str, wanted: Mapping[str, Any]) -> None:
    wrong = {k: config.get(k) for k, v in wanted.items() if _as_tuple(config.get(k)) != v}
    if wrong:
        listed = ", ".join(f"{k}={v!r} (the reference computes {wanted[k]!r})" for k, v in wrong.items())
        raise LayoutError(f"{component}: the reference layout cannot express {listed}")


def controlnet_config_to_reference(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A `ControlNet3D` config → (reference config, reference class name); options it cannot express raise."""
    _require(config, "controlnet", REFERENCE_CONTROLNET_OPTIONS)
    cfg = public_config(config)
    blocks = [int(c) for c in cfg["block_out_channels"]]
    layers = int(cfg["layers_per_block"])
    channels = [int(c) for c in cfg["conditioning_embedding_channels"]]
    factor = int(cfg.get("conditioning_downsample_factor") or cfg["vae_scale_factor"])
    positions = [int(p) for p in cfg.get("temporal_layers") or []]
    two_d = int(cfg["conditioning_temporal_kernel"]) == 1
    if two_d and positions:
        raise LayoutError(
            "controlnet: a temporal-kernel-1 embedder with temporal layers has no reference layout"
        )
    if not two_d and int(cfg["conditioning_temporal_kernel"]) != 3:
        raise LayoutError("controlnet: the reference's 3D embedder has temporal kernel 3")
    if positions and positions != default_temporal_layers(blocks, layers):
        raise LayoutError(f"controlnet: temporal layers {positions} are not the reference's positions")
    if positions:
        expected = reference_temporal_heads(blocks, layers, cfg["attention_head_dim"])
        given = [list(map(int, h)) for h in cfg.get("temporal_attention_heads") or []]
        if given != expected:
            raise LayoutError(f"controlnet: temporal heads {given} are not the reference's {expected}")
    stride2 = int(math.log2(factor))
    out = {k: cfg[k] for k in _ENCODER_EXPORT_KEYS if k in cfg}
    out.update(
        conditioning_in_channels=int(cfg["conditioning_channels"]),
        conditioning_embedding_out_channels=channels,
        use_metadata=bool(cfg.get("use_metadata", True)),
        num_metadata=int(cfg.get("num_metadata_fields", 7)),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    if two_d:
        scale = _scale_for_stages(stride2, len(channels) - 1)
        return {"_class_name": CONTROLNET_2D, **out, "conditioning_scale": scale}, CONTROLNET_2D
    if stride2 != len(channels) - 1:
        raise LayoutError("controlnet: the reference's 3D embedder strides by 2 in every stage")
    return {"_class_name": CONTROLNET_3D, **out, "use_temporal_transformer": bool(positions)}, CONTROLNET_3D


def _scale_for_stages(stride2: int, stages: int) -> int:
    for scale in (1, 2, 4, 8):
        if stride_stages_2d(scale, stages) == stride2:
            return scale
    raise LayoutError(f"controlnet: no reference conditioning_scale gives {stride2} stride-2 stages")


_ENCODER_EXPORT_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
)


def unused_mixing_params(config: Mapping[str, Any]) -> list[str]:
    """Names of the reference's frozen zero `mixing_attns` at positions without a temporal layer."""
    positions = set(int(p) for p in config.get("temporal_layers") or [])
    if not positions:
        return []
    count = len(residual_layout(config["block_out_channels"], int(config["layers_per_block"]))[0])
    return [f"mixing_attns.{i}" for i in range(count) if i not in positions]


__all__ = [
    "CONTROLNET_2D",
    "CONTROLNET_3D",
    "CONTROLNET_CLASSES",
    "LayoutError",
    "MappingReport",
    "NameRule",
    "NameTable",
    "POSITION_IDS",
    "UNET_CLASSES",
    "UNET_TABLE",
    "VAE_LEGACY_TABLE",
    "VAE_TABLE",
    "controlnet_config_from_reference",
    "controlnet_config_to_reference",
    "controlnet_table",
    "export_state_dict",
    "has_text_model_prefix",
    "text_encoder_table",
    "import_state_dict",
    "model_shapes",
    "reference_temporal_heads",
    "satunet_config_from_reference",
    "satunet_config_to_reference",
    "unused_mixing_params",
    "uses_legacy_vae_names",
]
