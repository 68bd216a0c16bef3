"""The DiffusionSat reference code's released checkpoints → project pipeline folders, and back.

`convert_reference` reads a checkpoint in the reference code's layout — a pipeline folder
(``model_index.json`` with ``unet/`` or ``checkpoint-N/unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, optionally ``controlnet/``), or a lone ``unet/`` / ``controlnet/`` model folder with a
``base`` that supplies the rest — maps every tensor through the name tables of
`dsat_core.models.reference_layout`, and writes a `DiffusionSatPipeline` / `SatControlNetPipeline` folder
(safetensors + JSON) with a model card (``README.md``) and a record of the conversion (``conversion.json``:
the source files and their sha256, the mapping of every tensor, the options that give the reference's
semantics). `export_reference` writes a project model back in the reference layout; reference → project →
reference gives every tensor back unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import save_file

from ..models import reference_layout as layout
from ..models.controlnet3d import ControlNet3D
from ..models.sat_unet import SatUNet
from ..models.text_encoders import ClipTextEncoder
from ..models.vae import vae_scale_factor
from ..models.weights_io import find_weights_file, read_state_dict, sha256_file
from .controlnet import SatControlNetPipeline
from .diffusionsat import DiffusionSatPipeline

CONVERSION_RECORD = "conversion.json"
MODEL_CARD = "README.md"
DEFAULT_LICENSE = (
    "DiffusionSat weights by Khanna et al. (ICLR 2024), released on Zenodo (community 'diffusionsat'; the "
    "reference code is Apache-2.0 — check the record of the checkpoint you downloaded for the weights' "
    "terms). Fine-tuned from Stable Diffusion 2.1: CreativeML Open RAIL++-M."
)
REFERENCE_DIFFUSERS_VERSION = "0.17.0.dev0"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


@dataclass
class ReferenceCheckpoint:
    """Where the parts of a reference-layout checkpoint are (None: not in this checkpoint)."""

    root: Path
    unet: Path | None = None
    controlnet: Path | None = None
    components: Path | None = None  # the folder holding vae/, text_encoder/, tokenizer/, scheduler/


def _latest_model_dir(root: Path, name: str) -> Path | None:
    """``root/name``, else ``root/checkpoint-N/name`` with the largest N (None if neither has a config)."""
    if (root / name / "config.json").is_file():
        return root / name
    steps = []
    for sub in root.glob(f"checkpoint-*/{name}/config.json"):
        found = _CHECKPOINT_DIR.fullmatch(sub.parent.parent.name)
        if found:
            steps.append((int(found.group(1)), sub.parent))
    return max(steps)[1] if steps else None


def _is_project_folder(root: Path) -> bool:
    index = root / "model_index.json"
    if index.is_file() and "dsat_core" in index.read_text():
        return True
    unet_config = root / "unet" / "config.json"
    return unet_config.is_file() and "num_metadata_fields" in json.loads(unet_config.read_text())


def find_reference_checkpoint(path: str | os.PathLike) -> ReferenceCheckpoint:
    """Locate the parts of a reference checkpoint folder; a `LayoutError` says why a folder is none."""
    root = Path(path)
    if not root.is_dir():
        raise layout.LayoutError(f"{root}: not a folder")
    if _is_project_folder(root):
        raise layout.LayoutError(
            f"{root}: already a project pipeline folder; load it with DiffusionSatPipeline.from_pretrained"
        )
    config = root / "config.json"
    if config.is_file():
        class_name = json.loads(config.read_text()).get("_class_name")
        if class_name in layout.UNET_CLASSES:
            return ReferenceCheckpoint(root, unet=root)
        if class_name in layout.CONTROLNET_CLASSES:
            return ReferenceCheckpoint(root, controlnet=root)
        raise layout.LayoutError(f"{config}: class {class_name!r} is not a DiffusionSat UNet or ControlNet")
    found = ReferenceCheckpoint(
        root,
        unet=_latest_model_dir(root, "unet"),
        controlnet=_latest_model_dir(root, "controlnet"),
        components=root if (root / "vae").is_dir() else None,
    )
    if found.unet is None and found.controlnet is None:
        raise layout.LayoutError(
            f"{root}: neither a reference pipeline folder (model_index.json with unet/ or "
            "checkpoint-N/unet/) nor a UNet / ControlNet model folder (config.json with _class_name "
            "SatUNet, ControlNetModel3D or ControlNetModel)"
        )
    return found


# ---------------------------------------------------------------------------------------------- import
@dataclass
class ConversionRecord:
    """What a conversion read and did; saved as ``conversion.json`` and summarised in the model card."""

    source: str
    files: dict[str, str] = field(default_factory=dict)  # source file → sha256
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored_config_keys: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    license: str = DEFAULT_LICENSE

    @property
    def sha256(self) -> str:
        """One hash over every source weights file (their sha256 values, sorted: location-independent)."""
        return hashlib.sha256("".join(sorted(self.files.values())).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "files": self.files,
            "license": self.license,
            "options": self.options,
            "ignored_config_keys": self.ignored_config_keys,
            "components": self.components,
        }


def _read_weights(folder: Path, record: ConversionRecord, allow_pickle: bool) -> dict[str, torch.Tensor]:
    file = find_weights_file(folder)
    state = read_state_dict(file, allow_pickle=allow_pickle)
    record.files[str(file)] = sha256_file(file)
    return state


def _load_into(
    model: torch.nn.Module,
    table: layout.NameTable,
    state: Mapping[str, torch.Tensor],
    name: str,
    record: ConversionRecord,
) -> None:
    mapped, report = layout.import_state_dict(table, state, layout.model_shapes(model), name)
    model.load_state_dict(mapped, strict=True)
    record.components[name] = report.to_dict()


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def load_reference_unet(folder: Path, record: ConversionRecord, allow_pickle: bool = False) -> SatUNet:
    """A reference `SatUNet` folder → a project SatUNet with ``missing_metadata="zero"``."""
    kwargs, ignored = layout.satunet_config_from_reference(_config(folder))
    record.ignored_config_keys["unet"] = ignored
    unet = SatUNet(**kwargs)
    _load_into(unet, layout.UNET_TABLE, _read_weights(folder, record, allow_pickle), "unet", record)
    return unet.eval()


def load_reference_controlnet(
    folder: Path, vae_factor: int, record: ConversionRecord, allow_pickle: bool = False
) -> ControlNet3D:
    """A reference `ControlNetModel3D` / `ControlNetModel` folder → a ControlNet3D with its options."""
    config = _config(folder)
    class_name = config.get("_class_name", "")
    kwargs, ignored = layout.controlnet_config_from_reference(config, class_name, vae_factor)
    record.ignored_config_keys["controlnet"] = ignored
    record.options["controlnet_class"] = class_name
    controlnet = ControlNet3D(**kwargs)
    table = layout.controlnet_table(two_d=class_name == layout.CONTROLNET_2D)
    _load_into(controlnet, table, _read_weights(folder, record, allow_pickle), "controlnet", record)
    return controlnet.eval()


def load_reference_vae(folder: Path, record: ConversionRecord, allow_pickle: bool = False) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(layout.public_config(_config(folder)))
    state = _read_weights(folder, record, allow_pickle)
    legacy = layout.uses_legacy_vae_names(state)
    record.options["vae_legacy_attention_names"] = legacy
    _load_into(vae, layout.VAE_LEGACY_TABLE if legacy else layout.VAE_TABLE, state, "vae", record)
    return vae.eval()


def load_reference_text_encoder(
    root: Path, record: ConversionRecord, allow_pickle: bool = False
) -> ClipTextEncoder:
    """``text_encoder/`` (transformers CLIPTextModel) + ``tokenizer/`` → a `ClipTextEncoder`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = root / "text_encoder"
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    state = dict(_read_weights(folder, record, allow_pickle))
    prefixed = layout.has_text_model_prefix(state)
    position_key = (layout.TEXT_MODEL_PREFIX if prefixed else "") + layout.POSITION_IDS
    position_ids = state.pop(position_key, None)
    if position_ids is not None:
        if not torch.equal(position_ids.reshape(-1), torch.arange(position_ids.numel())):
            raise layout.LayoutError(f"text_encoder: {position_key} is not 0..n-1")
        record.options["text_encoder_position_ids"] = list(position_ids.shape)
    record.options["text_encoder_prefixed"] = prefixed
    table = layout.text_encoder_table(prefixed, layout.has_text_model_prefix(model.state_dict()))
    _load_into(model, table, state, "text_encoder", record)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    return ClipTextEncoder(model.eval(), tokenizer).eval()


def load_reference_scheduler(root: Path, record: ConversionRecord) -> SchedulerMixin:
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    name = config.get("_class_name", "")
    scheduler_cls: type[SchedulerMixin] | None = getattr(diffusers, name, None)
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
        raise layout.LayoutError(f"{root / 'scheduler'}: {name!r} is not a diffusers scheduler")
    record.options["scheduler"] = layout.public_config(config) | {"_class_name": name}
    return scheduler_cls.from_config(config)


def _base_parts(
    base: Path | None, needed: set[str], record: ConversionRecord, allow_pickle: bool
) -> dict[str, Any]:
    """The ``needed`` parts (unet, vae, text_encoder, scheduler) from ``base``: a project pipeline folder, a
    reference checkpoint, or a Stable Diffusion 2.1 folder (diffusers layout) for vae / text encoder /
    scheduler."""
    if base is None or not needed:
        return {}
    record.options["base"] = str(base)
    if _is_project_folder(base):
        pipe = DiffusionSatPipeline.from_pretrained(str(base))
        components = {
            "unet": pipe.unet,
            "vae": pipe.vae,
            "text_encoder": pipe.text_encoder,
            "scheduler": pipe.scheduler,
        }
        return {k: v for k, v in components.items() if k in needed}
    found = find_reference_checkpoint(base)
    parts: dict[str, Any] = {}
    if "unet" in needed and found.unet is not None:
        parts["unet"] = load_reference_unet(found.unet, record, allow_pickle)
    if needed - {"unet"} and found.components is not None:
        parts.update(_components(found.components, record, allow_pickle))
    return parts


def _components(root: Path, record: ConversionRecord, allow_pickle: bool) -> dict[str, Any]:
    return {
        "vae": load_reference_vae(root / "vae", record, allow_pickle),
        "text_encoder": load_reference_text_encoder(root, record, allow_pickle),
        "scheduler": load_reference_scheduler(root, record),
    }


def load_reference_pipeline(
    checkpoint: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    license: str | None = None,
) -> tuple[DiffusionSatPipeline, ConversionRecord]:
    """A reference checkpoint (and ``base`` for the parts it lacks) as a project pipeline + its record.

    The pipeline samples the reference's way: ``uncond_metadata="zero"`` guidance, the source scheduler.
    """
    found = find_reference_checkpoint(checkpoint)
    record = ConversionRecord(source=str(Path(checkpoint).resolve()), license=license or DEFAULT_LICENSE)
    parts: dict[str, Any] = {}
    if found.unet is not None:
        parts["unet"] = load_reference_unet(found.unet, record, allow_pickle)
        record.options["unet_folder"] = str(found.unet.relative_to(found.root))
    if found.components is not None:
        parts.update(_components(found.components, record, allow_pickle))
    needed = {"unet", "vae", "text_encoder", "scheduler"} - set(parts)
    parts.update(_base_parts(Path(base) if base else None, needed, record, allow_pickle))
    lacking = sorted(needed - set(parts))
    if lacking:
        raise layout.LayoutError(
            f"{found.root}: the checkpoint has no {', '.join(lacking)}; give --base (a reference pipeline "
            "folder or a converted project pipeline folder) for them"
        )
    record.options["uncond_metadata"] = "zero"
    pipe = DiffusionSatPipeline(**parts, uncond_metadata="zero")
    if found.controlnet is None:
        return pipe, record
    controlnet = load_reference_controlnet(
        found.controlnet, vae_scale_factor(parts["vae"]), record, allow_pickle
    )
    return SatControlNetPipeline.from_diffusionsat(pipe, controlnet), record


@contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` that replaces it only when the block finishes (nothing half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def convert_reference(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    license: str | None = None,
) -> ConversionRecord:
    """Convert a reference checkpoint into a project pipeline folder ``out`` (see the module)."""
    pipe, record = load_reference_pipeline(checkpoint, base=base, allow_pickle=allow_pickle, license=license)
    out = Path(out)
    with _staged_folder(out) as stage:
        pipe.save_pretrained(str(stage), safe_serialization=True)
        (stage / CONVERSION_RECORD).write_text(json.dumps(record.to_dict(), indent=1))
        (stage / MODEL_CARD).write_text(model_card(record, pipe))
    return record


def model_card(record: ConversionRecord, pipe: DiffusionSatPipeline) -> str:
    """Markdown model card: the source checkpoint, its hash and licence, the options it samples with."""
    kind = "SatControlNetPipeline" if isinstance(pipe, SatControlNetPipeline) else "DiffusionSatPipeline"
    files = "\n".join(f"| `{Path(f).name}` | `{f}` | `{h}` |" for f, h in record.files.items())
    options = "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in record.options.items() if k != "scheduler")
    controlnet = ""
    if isinstance(pipe, SatControlNetPipeline):
        cfg = pipe.controlnet.config
        picked = ("missing_metadata", "temporal_mixing", "frame_reduction", "conditioning_range")
        controlnet = "\n".join(f"- controlnet `{k}`: `{json.dumps(cfg[k])}`" for k in picked) + "\n"
    return f"""# Converted DiffusionSat checkpoint ({kind})

Converted from the DiffusionSat reference code's layout with `dsat convert reference`.

- source: `{record.source}`
- checkpoint sha256 (over the weights files below): `{record.sha256}`
- licence: {record.license}

| file | path | sha256 |
|---|---|---|
{files}

## Computed the reference's way
- unet `missing_metadata`: `{pipe.unet.config.missing_metadata}` (a missing field is the value 0)
- guidance: `uncond_metadata = zero` (unconditional branch: empty prompt, all metadata zero)
{controlnet}{options}

Every tensor and where it went: `{CONVERSION_RECORD}`. Back to the reference layout:
`dsat convert export-reference --model <this folder> --out <folder>`.
"""


# ---------------------------------------------------------------------------------------------- export
def _save_model(
    folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], file: str
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=1, default=list))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / file))


def _load_project_pipeline(model_dir: Path) -> DiffusionSatPipeline:
    index = json.loads((model_dir / "model_index.json").read_text())
    cls = SatControlNetPipeline if "controlnet" in index else DiffusionSatPipeline
    return cls.from_pretrained(str(model_dir))


def export_reference(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the project pipeline folder ``model_dir`` in the reference layout (safetensors weights)."""
    model_dir, out = Path(model_dir), Path(out)
    pipe = _load_project_pipeline(model_dir)
    if not isinstance(pipe.text_encoder, ClipTextEncoder):
        raise layout.LayoutError(
            f"{model_dir}: the reference layout needs a CLIP text encoder, "
            f"not {type(pipe.text_encoder).__name__}"
        )
    record_file = model_dir / CONVERSION_RECORD
    options = json.loads(record_file.read_text()).get("options", {}) if record_file.is_file() else {}
    with _staged_folder(out) as stage:
        _export_unet(pipe.unet, stage / "unet")
        _export_vae(pipe.vae, stage / "vae", legacy=bool(options.get("vae_legacy_attention_names")))
        _export_text_encoder(pipe.text_encoder, stage, options)
        pipe.scheduler.save_config(str(stage / "scheduler"))
        index = _reference_index(pipe)
        if isinstance(pipe, SatControlNetPipeline):
            index["controlnet"] = ["diffusionsat", _export_controlnet(pipe.controlnet, stage / "controlnet")]
        (stage / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def _reference_index(pipe: DiffusionSatPipeline) -> dict[str, Any]:
    controlnet = isinstance(pipe, SatControlNetPipeline)
    return {
        "_class_name": "DiffusionSatControlNetPipeline" if controlnet else "DiffusionSatPipeline",
        "_diffusers_version": REFERENCE_DIFFUSERS_VERSION,
        "unet": ["diffusionsat", "SatUNet"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _export_unet(unet: SatUNet, folder: Path) -> None:
    config = layout.satunet_config_to_reference(unet.config)
    state = layout.export_state_dict(layout.UNET_TABLE, unet.state_dict(), "unet")
    _save_model(folder, {**config, "_diffusers_version": REFERENCE_DIFFUSERS_VERSION}, state, _WEIGHTS)


def _export_controlnet(controlnet: ControlNet3D, folder: Path) -> str:
    config, class_name = layout.controlnet_config_to_reference(controlnet.config)
    table = layout.controlnet_table(two_d=class_name == layout.CONTROLNET_2D)
    state = layout.export_state_dict(table, controlnet.state_dict(), "controlnet")
    for name in layout.unused_mixing_params(controlnet.config):
        state[name] = torch.zeros(())
    _save_model(folder, {**config, "_diffusers_version": REFERENCE_DIFFUSERS_VERSION}, state, _WEIGHTS)
    return class_name


def _export_vae(vae: AutoencoderKL, folder: Path, legacy: bool) -> None:
    table = layout.VAE_LEGACY_TABLE if legacy else layout.VAE_TABLE
    state = layout.export_state_dict(table, vae.state_dict(), "vae")
    config = {"_class_name": "AutoencoderKL", **layout.public_config(vae.config)}
    _save_model(folder, config, state, _WEIGHTS)


def _export_text_encoder(encoder: ClipTextEncoder, root: Path, options: Mapping[str, Any]) -> None:
    """CLIP text model tensors under the names (and with the position_ids buffer) the source had."""
    model = encoder.text_encoder
    prefixed = bool(options.get("text_encoder_prefixed", True))
    table = layout.text_encoder_table(prefixed, layout.has_text_model_prefix(model.state_dict()))
    state = layout.export_state_dict(table, model.state_dict(), "text_encoder")
    shape = options.get("text_encoder_position_ids")
    if shape is not None:
        key = (layout.TEXT_MODEL_PREFIX if prefixed else "") + layout.POSITION_IDS
        state[key] = torch.arange(math.prod(shape)).reshape(shape)
    folder = root / "text_encoder"
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    encoder.tokenizer.save_pretrained(root / "tokenizer")


_WEIGHTS = "diffusion_pytorch_model.safetensors"

__all__ = [
    "ConversionRecord",
    "ReferenceCheckpoint",
    "convert_reference",
    "export_reference",
    "find_reference_checkpoint",
    "load_reference_pipeline",
    "model_card",
]
