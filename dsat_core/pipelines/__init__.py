"""DiffusionSat pipelines."""

from .diffusionsat import DiffusionSatPipeline, DiffusionSatPipelineOutput, make_tiny_pipeline

__all__ = ["DiffusionSatPipeline", "DiffusionSatPipelineOutput", "make_tiny_pipeline"]
from .controlnet import SatControlNetPipeline, inpainting_condition  # noqa: E402

__all__ += ["SatControlNetPipeline", "inpainting_condition"]
