"""Read model weights from files of other projects: safetensors always, pickle only when asked.

Checkpoints the project writes are safetensors + JSON. Weights published by others may be pickled
(`.bin` / `.ckpt` / `.pt`); those are read only with ``allow_pickle=True`` and then with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# file names diffusers writes for one model folder, preferred first
WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class WeightsError(ValueError):
    """A weights file or folder that cannot be read; the message names the file and the reason."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def find_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of a diffusers-style model folder (safetensors preferred over pickle)."""
    root = Path(folder)
    for name in WEIGHT_FILE_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted(p.name for p in root.iterdir() if p.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
    if len(found) == 1:
        return root / found[0]
    if not found:
        raise WeightsError(f"{root}: no weights file (looked for {', '.join(WEIGHT_FILE_NAMES)})")
    raise WeightsError(f"{root}: several weights files {found}; sharded checkpoints are not supported")


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of the weights file of a model folder, on CPU.

    Pickle files need ``allow_pickle=True`` and are read with ``weights_only=True``; a truncated or corrupt
    file, or one holding anything but tensors, is a `WeightsError` naming it.
    """
    file = Path(path)
    if file.is_dir():
        file = find_weights_file(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    if file.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(file)
    if file.suffix in PICKLE_SUFFIXES:
        return _read_pickle(file, allow_pickle)
    raise WeightsError(
        f"{file}: unknown weights format {file.suffix!r} (expected .safetensors or .bin/.ckpt)"
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None


def _read_pickle(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise WeightsError(
            f"{file}: a pickle checkpoint; pickle can run code, so it is read only with --allow-pickle "
            "(then with torch.load(weights_only=True))"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe pickles
        raise WeightsError(f"{file}: cannot be read with weights_only=True: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{file}: holds no flat tensor state dict")
    return state


__all__ = [
    "WeightsError",
    "find_weights_file",
    "read_state_dict",
    "sha256_file",
]
