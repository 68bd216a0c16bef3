"""MLflow "model from code" wrapping a saved `DiffusionSatPipeline` (logged by `MlflowTracker.log_pipeline`).

Input: a DataFrame (or list of dicts) with a `prompt` column and optional metadata columns
`lon, lat, gsd, cloud_cover, year, month, day` (missing / NaN = unknown). Params: `num_inference_steps`,
`guidance_scale`, `seed`. Output: uint8 images (N, H, W, 3). The logged signature
(`mlflow_logging.pyfunc_signature`) says the same; MLflow hands `predict` a DataFrame.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model


def _value(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value) if name in ("year", "month", "day") else float(value)


class DiffusionSatPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from dsat_core.pipelines import DiffusionSatPipeline

        self.pipeline = DiffusionSatPipeline.from_pretrained(context.artifacts["pipeline"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Images for each row of `model_input` (a list of dicts works too when called directly)."""
        import torch

        from dsat_core.metadata import FIELD_NAMES, SatMetadata
        from dsat_core.training.mlflow_logging import PREDICT_DEFAULTS

        params = {**PREDICT_DEFAULTS, **(params or {})}
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        prompts = [str(r.get("prompt", "")) for r in rows]
        metadata = [SatMetadata(**{n: _value(r, n) for n in FIELD_NAMES}) for r in rows]
        generator = torch.Generator().manual_seed(int(params["seed"]))
        out = self.pipeline(
            prompts,
            metadata=metadata,
            num_inference_steps=int(params["num_inference_steps"]),
            guidance_scale=float(params["guidance_scale"]),
            generator=generator,
            output_type="np",
        )
        return (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)


set_model(DiffusionSatPyfunc())
