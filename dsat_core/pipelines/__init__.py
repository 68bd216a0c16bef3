"""DiffusionSat pipelines: text + metadata → image (`DiffusionSatPipeline`) and the ControlNet tasks
(`SatControlNetPipeline`).

Names are imported on first use, like every `dsat_core` package namespace (`dsat_core._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.pipelines.controlnet import (
        SatControlNetPipeline,
        inpainting_condition,
        make_tiny_controlnet_pipeline,
    )
    from dsat_core.pipelines.diffusionsat import (
        DiffusionSatPipeline,
        DiffusionSatPipelineOutput,
        make_tiny_pipeline,
    )

_MODULE_OF = {
    "DiffusionSatPipeline": "diffusionsat",
    "DiffusionSatPipelineOutput": "diffusionsat",
    "SatControlNetPipeline": "controlnet",
    "inpainting_condition": "controlnet",
    "make_tiny_controlnet_pipeline": "controlnet",
    "make_tiny_pipeline": "diffusionsat",
}

__all__ = [
    "DiffusionSatPipeline",
    "DiffusionSatPipelineOutput",
    "SatControlNetPipeline",
    "inpainting_condition",
    "make_tiny_controlnet_pipeline",
    "make_tiny_pipeline",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
