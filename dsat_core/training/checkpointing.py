"""Training checkpoints as safetensors + JSON only (no pickle anywhere), with rotation and resume.

Why not `accelerator.save_state`: accelerate 1.x writes the model as safetensors but the optimizer
(`optimizer.bin`), LR scheduler (`scheduler.bin`), GradScaler (`scaler.pt`) and RNG states
(`random_states_<rank>.pkl`, holding numpy/python RNG tuples) with `torch.save`, i.e. pickle. Here every
tensor goes to a safetensors file and everything else to JSON:

    checkpoint-<step>/
        unet/                          diffusers folder (config.json + safetensors), trained weights
        unet_ema/                      diffusers folder with the EMA weights (if EMA is used)
        ema.safetensors                exact EMA state (fp32 shadow, decay and step in the header)
        text_projection.safetensors    trainable text projection (if any)
        optimizer.safetensors          optimizer tensors (`state.<param index>.<name>`)
        training_state.json            step, optimizer param groups, LR scheduler, GradScaler, run ids
        rng_rank<r>.safetensors/.json  torch (+CUDA) RNG and python/numpy RNG of each rank

A checkpoint is written to `checkpoint-<step>.partial` and renamed when every rank has finished,
so `latest` never picks a half-written one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FILE = "training_state.json"


# ---------------------------------------------------------------------------- discovery / rotation
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`None` → None; `"latest"` → newest complete checkpoint (None if there is none); else that folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from!r}: {path} has no {STATE_FILE}")
    return path


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `total_limit` remain; return the removed ones."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    removed = found[: max(0, len(found) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


# ---------------------------------------------------------------------------- optimizer
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def optimizer_state_to_safetensors(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _jsonable(value)
    layout = {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}
    return tensors, layout


def optimizer_state_from_safetensors(
    tensors: dict[str, torch.Tensor], layout: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in layout["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- RNG
def capture_rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: str | Path,
    global_step: int,
    *,
    unet: ModelMixin,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None,
    text_projection: torch.nn.Module | None,
    scaler: Any | None,
    extra_state: dict[str, Any],
    is_main_process: bool,
    process_index: int,
    device: torch.device,
    wait_for_everyone: Callable[[], None],
    total_limit: int | None = None,
) -> Path:
    """Write `checkpoint-<global_step>` (all ranks call this; only the main one writes shared files)."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
    partial = final.with_name(final.name + ".partial")
    if is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    wait_for_everyone()

    rng_tensors, rng_meta = capture_rng_state(device)
    save_file(rng_tensors, str(partial / f"rng_rank{process_index}.safetensors"))
    (partial / f"rng_rank{process_index}.json").write_text(json.dumps(rng_meta))

    if is_main_process:
        unet.save_pretrained(str(partial / "unet"), safe_serialization=True)
        if ema is not None:
            ema.save(partial / "ema.safetensors")
            ema.save_pretrained(unet, partial / "unet_ema")
        if text_projection is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in text_projection.state_dict().items()},
                str(partial / "text_projection.safetensors"),
            )
        opt_tensors, opt_layout = optimizer_state_to_safetensors(optimizer.state_dict())
        save_file(opt_tensors, str(partial / "optimizer.safetensors"))
        state = {
            "global_step": global_step,
            "optimizer": opt_layout,
            "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
            "scaler": None if scaler is None else _jsonable(scaler.state_dict()),
            **extra_state,
        }
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
    wait_for_everyone()
    if is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        rotate_checkpoints(output_dir, total_limit)
    wait_for_everyone()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any | None,
    text_projection: torch.nn.Module | None,
    scaler: Any | None,
    process_index: int,
    device: torch.device,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the given live objects; return the JSON state."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    weights = sorted((path / "unet").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"checkpoint {path}: no safetensors weights in {path / 'unet'}")
    unet_state: dict[str, torch.Tensor] = {}
    for file in weights:
        unet_state.update(load_file(str(file)))
    missing, unexpected = unet.load_state_dict(unet_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path}: UNet weights mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no EMA state but use_ema is set")
        ema.load(ema_file)
    if text_projection is not None:
        proj_file = path / "text_projection.safetensors"
        if proj_file.is_file():
            text_projection.load_state_dict(load_file(str(proj_file)))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(optimizer_state_from_safetensors(opt_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_rank{process_index}.safetensors"
    if rng_file.is_file():
        rng_meta = json.loads((path / f"rng_rank{process_index}.json").read_text())
        restore_rng_state(load_file(str(rng_file)), rng_meta, device)
    return state
