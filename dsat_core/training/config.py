"""`TrainConfig`: every knob of `train_diffusionsat`, typed, JSON round-trippable, settable from the CLI."""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from dsat_core.models.configs import UNetSize

# = `dsat_core.models.metadata_embedding.MissingMetadata` (repeated: this module must stay free of torch)
MetadataDropoutMode = Literal["learned", "zero"]
METADATA_DROPOUT_MODES: tuple[str, ...] = typing.get_args(MetadataDropoutMode)
#: draw each item (scene) or each platform (sensor) equally often instead of each tile
BalanceBy = Literal["item", "platform"]


class TrainConfig(BaseModel):
    """Configuration of one DiffusionSat training run (defaults follow spec §1 where it gives one)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    store_uri: str
    product: str = "rgb"
    storage_options: dict[str, Any] | None = None
    bbox: tuple[float, float, float, float] | None = None
    start: str | None = Field(default=None, description="ISO date: keep tiles acquired on/after it")
    end: str | None = Field(default=None, description="ISO date: keep tiles acquired on/before it")
    platform: str | None = None
    split: Literal["train", "holdout"] | None = Field(
        default="train", description="train on the train split; the holdout split is for evaluation"
    )
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    use_cached_latents: bool = False
    dataloader_num_workers: int = 0
    balance_by: BalanceBy | None = Field(
        default=None,
        description="draw tiles so that each item (scene) or platform (sensor) comes equally often "
        "(with replacement); None: each tile once per epoch",
    )

    # model
    output_dir: str
    model_size: UNetSize = "tiny"
    pretrained_sd: str | None = Field(
        default=None,
        description="local SD 2.1: a diffusers folder (unet/ + vae/ + text encoder) or a single-file "
        ".safetensors checkpoint (base 512 or 768-v; UNet + VAE, the text encoder from `text_encoder`)",
    )
    init_from: str | None = Field(
        default=None,
        validation_alias=AliasChoices("init_from", "pretrained_diffusionsat"),
        description="a project pipeline folder to fine-tune (e.g. a converted reference checkpoint), or "
        '"default": the shipped 64 px base model; train-controlnet takes a SatControlNetPipeline folder '
        "(base + ControlNet) or a DiffusionSatPipeline",
    )
    text_encoder: str = Field(default="minilm", description="text encoder spec for load_text_encoder")
    vae: str = Field(
        default="tiny", description="'tiny' (random tiny VAE, offline CPU) or a local VAE folder"
    )
    resolution: int = 32

    # optimisation
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_steps: int = 100
    stop_at_step: int | None = Field(
        default=None,
        description="end this invocation at this step (time-boxed jobs); the schedule uses max_steps",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    train_text_projection: bool = True

    # objective and conditioning dropout
    snr_gamma: float | None = 5.0
    caption_dropout: float = 0.1
    caption_phrase_dropout: float = 0.1
    metadata_dropout: float = 0.1
    metadata_dropout_mode: MetadataDropoutMode | None = Field(
        default=None,
        description="the trained model's `missing_metadata`: a dropped or missing field is its learned "
        "missing embedding ('learned') or the value 0 marked present ('zero', the reference's behaviour); "
        "None: the initial model's (a converted reference model: 'zero'; a new one: 'learned')",
    )
    use_metadata: bool = True
    random_flip_rotate: bool = Field(
        default=False,
        description="turn each training tile by a random multiple of 90° and mirror it at random "
        "(`dsat_core.training.augment`): 8 views per tile for small stores; shadows then point any way",
    )

    # EMA
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = Field(default=None, description="'latest' or a checkpoint folder")
    seed: int = 0

    # validation samples
    validation_steps: int | None = None
    num_validation_samples: int = 4
    validation_prompts: list[str] | None = None
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 3.0

    # logging
    log_every: int = 1
    use_mlflow: bool = True
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in output_dir)",
    )
    mlflow_experiment: str = "diffusionsat"
    mlflow_run_name: str | None = None
    mlflow_parent_run_id: str | None = Field(default=None, description="nest the run under this pipeline run")
    registered_model_name: str | None = None
    save_pipeline: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("caption_dropout", "caption_phrase_dropout", "metadata_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.random_flip_rotate and self.use_cached_latents:
            raise ValueError("random_flip_rotate turns the tiles before encoding: not with cached latents")
        if self.pretrained_sd and self.init_from:
            raise ValueError("give at most one of pretrained_sd and init_from")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        return self

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError as err:
            raise FileNotFoundError(f"training config {path} does not exist") from err

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    def flat_params(self) -> dict[str, str]:
        """Flattened string params for MLflow (nested values as JSON, capped at MLflow's 6000 chars).

        Values under secret-looking keys (e.g. `storage_options.secret`) are replaced by `***`.
        """
        out = {}
        for key, value in self.model_dump().items():
            value = redact_secrets(value)
            text = value if isinstance(value, str) else json.dumps(value)
            out[key] = text[:6000]
        return out

    # ------------------------------------------------------------------ CLI
    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--field` flag per config field (lists/dicts/tuples take JSON)."""
        for name, field in cls.model_fields.items():
            parser.add_argument(
                f"--{name}",
                f"--{name.replace('_', '-')}",
                dest=name,
                default=None,
                type=str,
                help=field.description or f"(default {field.default!r})",
            )

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> Self:
        """`--config cfg.json` plus `--field value` overrides."""
        parser = argparse.ArgumentParser(
            description="Train DiffusionSat (see dsat_core.training.TrainConfig)"
        )
        parser.add_argument("--config", type=str, default=None, help="JSON file with TrainConfig fields")
        cls.add_cli_arguments(parser)
        args = parser.parse_args(argv)
        data: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
        for name, field in cls.model_fields.items():
            raw = getattr(args, name)
            if raw is not None:
                data[name] = _parse_cli_value(raw, field.annotation)
        return cls.model_validate(data)


_SECRET_KEYS = ("key", "secret", "token", "password", "credential", "auth")


def redact_secrets(value: Any) -> Any:
    """A copy of nested dicts/lists with values under secret-looking keys replaced by `***`."""
    if isinstance(value, dict):
        return {
            k: "***" if any(word in str(k).lower() for word in _SECRET_KEYS) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    return value


def _parse_cli_value(raw: str, annotation: Any) -> Any:
    """Strings stay strings; everything else is read as JSON when it parses (pydantic coerces the rest)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    is_union = origin in (typing.Union, types.UnionType)
    if raw.lower() in ("none", "null") and (is_union and type(None) in args):
        return None
    if annotation is str or (is_union and str in args and len(args) == 2):
        return raw
    if origin is Literal:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
