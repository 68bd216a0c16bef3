"""The pyfunc model logged by training: a real signature, no MLflow type-hint warning, and it serves."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from dsat_core.metadata import FIELD_NAMES
from dsat_core.training.mlflow_logging import PREDICT_DEFAULTS, MlflowTracker


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# MLflow's complaints about a predict function it cannot read a schema from (red / yellow warnings, logs)
TYPE_HINT_WARNINGS = (
    "Type hint used in the model's predict function is not supported",
    "Failed to infer signature from type hint",
    "Failed to infer model signature",
    "Add type hints to the `predict` method",
)


def test_logged_pyfunc_has_a_signature_and_no_type_hint_warning(tmp_path: Path) -> None:
    import mlflow

    from dsat_core.pipelines import make_tiny_pipeline

    make_tiny_pipeline(sample_size=8).save_pretrained(tmp_path / "pipe")
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "pyfunc-signature")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.onceregistry.clear()  # MLflow shows its type-hint warnings once per process
        handler = _Records()
        logging.getLogger("mlflow").addHandler(handler)
        try:
            version = tracker.log_pipeline(tmp_path / "pipe", "dsat-sig", pip_requirements=["torch"])
        finally:
            logging.getLogger("mlflow").removeHandler(handler)
            tracker.end()
    messages = [str(w.message) for w in caught] + handler.messages
    assert version == "1"
    assert not [m for m in messages if any(w in m for w in TYPE_HINT_WARNINGS)], messages

    signature = mlflow.models.get_model_info("models:/dsat-sig/1").signature
    assert signature is not None
    inputs = {spec.name: spec for spec in signature.inputs.inputs}
    assert list(inputs) == ["prompt", *FIELD_NAMES]
    assert inputs["prompt"].required and not any(inputs[n].required for n in FIELD_NAMES)
    (output,) = signature.outputs.inputs
    assert output.type == np.dtype(np.uint8) and output.shape == (-1, -1, -1, 3)
    assert {p.name: p.default for p in signature.params.params} == PREDICT_DEFAULTS

    # the signature accepts what users send: ints for floats, rows with different fields present
    model = mlflow.pyfunc.load_model("models:/dsat-sig/1")
    rows = [{"prompt": "a farm", "lat": 52, "lon": 12.7, "year": 2020}, {"prompt": "a port", "month": 6}]
    out = model.predict(rows, params={"num_inference_steps": 1, "seed": 0})
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    with pytest.raises(mlflow.exceptions.MlflowException, match="prompt"):
        model.predict([{"lat": 1.0}])  # the prompt is required
