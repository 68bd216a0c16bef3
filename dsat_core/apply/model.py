"""The model of a run, from its URI (a pipeline folder, ``models:/name@alias`` / ``models:/name/N`` or
``runs:/<id>/path``), and how it turns a batch of tiles into images.

Two runners share one interface (`TileRunner`): `ControlNetRunner` (a `SatControlNetPipeline` and its task
card: the task says which product conditions it, the output factor and the conditioning) and
`GenerationRunner` (a `DiffusionSatPipeline`: each tile's metadata, no conditioning). The noise of each tile
comes from its own seed (`tile_seed`), so a tile's output does not depend on the batch it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from dsat_core.data.tasks import ControlNetTask, get_task, read_task_card
from dsat_core.evaluation.tracking import ModelSource, registered_model_name, resolve_model
from dsat_core.metadata import SatMetadata
from dsat_core.metadata.bands import align_bands
from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline
from dsat_core.pipelines.diffusionsat import DiffusionSatPipelineOutput

GENERATE = "generate"


@dataclass
class ModelInfo:
    """Provenance of the model: the URI asked for, its registered name / version / alias and MLflow run."""

    uri: str
    path: Path
    version: str
    name: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri, "name": self.name, "version": self.version, "alias": self.alias,
            "run_id": self.run_id, "path": str(self.path),
        }  # fmt: skip


def resolve(uri: str, work_dir: str | Path, tracking_uri: str | None) -> ModelInfo:
    """The model folder on local disk and its provenance (downloads registry / run models once)."""
    if uri.startswith(("models:/", "runs:/")) and not tracking_uri:
        raise ValueError(f"model {uri}: set MLFLOW_TRACKING_URI (or --mlflow-tracking-uri) to resolve it")
    source: ModelSource = resolve_model(uri, Path(work_dir) / "model", tracking_uri or "")
    alias = uri.split("@", 1)[1] if uri.startswith("models:/") and "@" in uri else None
    return ModelInfo(uri, source.path, source.version, registered_model_name(uri), alias, source.run_id)


@dataclass
class TileRunner:
    """A loaded model and what applying it needs: input product, output factor, output tile size."""

    pipe: DiffusionSatPipeline
    input_product: str
    steps: int = 20
    guidance_scale: float = 1.0
    prompt: str = "a satellite image"
    task: ControlNetTask | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: image-to-image start from the task's baseline (`ControlNetTask.place_baseline`); 1 = from noise
    strength: float = 1.0

    @property
    def output_factor(self) -> int:
        return 1

    @property
    def fills_mask(self) -> bool:
        return False

    @property
    def tile_px(self) -> int:
        """Output pixels a side of one tile: the UNet's sample size × the VAE factor."""
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Each tile's starting noise from its own seed."""
        side = self.tile_px // int(self.pipe.vae_scale_factor)
        shape = (int(self.pipe.unet.config.in_channels), side, side)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.pipe.device, self.pipe.unet.dtype)

    def check_bands(self, bands: Sequence[str]) -> list[str]:
        """Warnings about the input product's bands; `ValueError` when the model cannot take them."""
        return []

    def check_strength(self, bands: Sequence[str]) -> None:
        """`ValueError` when ``strength`` < 1 and the model has no baseline to start from (generation)."""
        if self.strength < 1.0:
            raise ValueError(
                f"strength {self.strength} < 1 starts from a ControlNet task's baseline; generation has "
                "none (use strength 1)"
            )

    def __call__(
        self,
        frames: torch.Tensor,
        bands: Sequence[str],
        fill: torch.Tensor | None,
        metadata: list[SatMetadata],
        frame_metadata: list[list[SatMetadata]],
        seeds: Sequence[int],
    ) -> np.ndarray:
        """float32 (B, 3, s, s) images in [0, 1] for a batch of tiles; ``frames`` (B, C, T, h, w) and
        ``frame_metadata`` (B lists of T) are the conditioning frames of each tile."""
        raise NotImplementedError


def _channels_first(output: Any) -> np.ndarray:
    """A pipeline's ``output_type="np"`` images (N, H, W, 3) as contiguous float32 (N, 3, H, W)."""
    images = cast(DiffusionSatPipelineOutput, output).images
    return np.ascontiguousarray(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2))


class GenerationRunner(TileRunner):
    """DiffusionSat over the AOI's tiles: each tile generated from its own metadata and the prompt."""

    def __call__(self, frames, bands, fill, metadata, frame_metadata, seeds) -> np.ndarray:  # noqa: ANN001
        return _channels_first(
            self.pipe(
                prompt=self.prompt,
                metadata=metadata,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                latents=self.latents(seeds),
                output_type="np",
            )
        )


class ControlNetRunner(TileRunner):
    """A ControlNet task over the AOI's tiles (the task card says how the frames condition it); ``strength``
    < 1 starts from the task's baseline (SDEdit, as evaluation), and each output is made
    `ControlNetTask.place_consistent` with the tile's frames (SR: back-projection onto the input)."""

    @property
    def control_task(self) -> ControlNetTask:
        if self.task is None:
            raise ValueError("a ControlNet runner needs its task")
        return self.task

    @property
    def control_pipe(self) -> SatControlNetPipeline:
        return cast(SatControlNetPipeline, self.pipe)

    @property
    def output_factor(self) -> int:
        return self.control_task.output_factor

    @property
    def fills_mask(self) -> bool:
        return self.control_task.fills_place_mask

    def check_bands(self, bands: Sequence[str]) -> list[str]:
        """The band rule of evaluation (`ControlNetTask.band_alignment`, the pipeline's ``cond_bands``): a
        ControlNet with band names takes the product's bands by name, its bands the product lacks marked
        missing (a warning) and the others dropped; none of its bands is an error. Without band names the
        channel count must match."""
        named = self.control_pipe.controlnet.config.get("conditioning_bands")
        probe = torch.zeros(1, len(bands), 1, 1, 1)
        fill = torch.zeros(1, 1, self.output_factor, self.output_factor) if self.fills_mask else None
        cond_bands = self.control_task.place_conditioning(probe, bands, fill)["cond_bands"]
        product = self.input_product
        if named is None:
            want = int(self.control_pipe.controlnet.config.conditioning_channels)
            if len(cond_bands) != want:
                raise ValueError(
                    f"the model takes {want} conditioning channels (no band names); the catalog's "
                    f"{product!r} product gives {len(cond_bands)} ({cond_bands})"
                )
            return []
        model_bands = [b for b in named if b != "mask"]
        alignment = align_bands(model_bands, [b for b in cond_bands if b != "mask"])
        if all(source is None for source in alignment.source):
            raise ValueError(
                f"none of the model's bands {model_bands} is in the catalog's {product!r} product "
                f"(it has {list(bands)})"
            )
        out = []
        if alignment.missing:
            out.append(
                f"the catalog's {product!r} product lacks the model's bands {list(alignment.missing)}: "
                f"marked missing (the ControlNet's learned missing-band value)"
            )
        if alignment.unknown:
            out.append(f"bands {list(alignment.unknown)} unknown to the model: dropped")
        return out

    def check_strength(self, bands: Sequence[str]) -> None:
        """`ValueError` when ``strength`` < 1 and the task has no baseline (`place_baseline` None)."""
        self._start(torch.zeros(1, len(bands), 1, 2, 2), bands)

    def _start(self, frames: torch.Tensor, bands: Sequence[str]) -> dict[str, Any]:
        """The pipeline's image-to-image inputs: none at strength 1, else the baseline of ``frames``."""
        if self.strength >= 1.0:
            return {}
        task = self.control_task
        baseline = task.place_baseline(frames, bands)
        if baseline is None:
            raise ValueError(
                f"strength {self.strength} < 1 starts from the task's baseline; the {task.name!r} task has "
                "none to start from (use strength 1)"
            )
        return {"init_image": baseline.to(self.pipe.device, torch.float32), "strength": self.strength}

    def _consistent(self, images: np.ndarray, frames: torch.Tensor, bands: Sequence[str]) -> np.ndarray:
        """`ControlNetTask.place_consistent` of the pipeline's (B, 3, s, s) [0, 1] images, on that scale."""
        signed = torch.from_numpy(images).to(frames.device, torch.float64) * 2.0 - 1.0
        made = self.control_task.place_consistent(signed, frames, bands)
        unit = ((made.double() + 1.0) / 2.0).clamp(0.0, 1.0)
        return np.ascontiguousarray(unit.cpu().numpy(), dtype=np.float32)

    def __call__(self, frames, bands, fill, metadata, frame_metadata, seeds) -> np.ndarray:  # noqa: ANN001
        frames = frames.to(self.pipe.device)
        inputs = self.control_task.place_conditioning(frames, bands, fill)
        if self.control_pipe.controlnet.config.get("conditioning_bands") is None:
            inputs.pop("cond_bands")
        images = _channels_first(
            self.control_pipe(
                cond_metadata=[list(m) for m in frame_metadata],
                metadata=metadata,
                prompt=self.prompt,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                latents=self.latents(seeds),
                output_type="np",
                **self._start(frames, bands),
                **inputs,
            )
        )
        return self._consistent(images, frames, bands)


def load_runner(
    kind: str,
    model: ModelInfo,
    *,
    product: str = "rgb",
    device: str = "cpu",
    steps: int = 20,
    guidance_scale: float | None = None,
    prompt: str = "a satellite image",
    strength: float = 1.0,
) -> TileRunner:
    """The runner for ``kind`` ("generate" or a registered ControlNet task name) over ``model``.

    A ControlNet's task comes from its card (``task.json``); a card of another task is an error.
    """
    cls: type[TileRunner]
    pipe: DiffusionSatPipeline
    if kind == GENERATE:
        pipe = DiffusionSatPipeline.from_pretrained(str(model.path))
        cls, task, guidance = GenerationRunner, None, 3.0 if guidance_scale is None else guidance_scale
        input_product = product
    else:
        task = read_task_card(model.path) or get_task(kind)()
        if task.name != kind:
            raise ValueError(f"{model.uri} holds a {task.name!r} ControlNet (task.json), not {kind!r}")
        pipe = SatControlNetPipeline.from_pretrained(str(model.path))
        cls, guidance, input_product = ControlNetRunner, guidance_scale or 1.0, task.input_product
    pipe = pipe.to(torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    return cls(pipe, input_product, steps, guidance, prompt, task, strength=strength)


__all__ = [
    "GENERATE",
    "ControlNetRunner",
    "GenerationRunner",
    "ModelInfo",
    "TileRunner",
    "load_runner",
    "resolve",
]
