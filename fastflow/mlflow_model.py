"""The MLflow pyfunc flavour of a trained FastFlow model (`mlflow.pyfunc.load_model` returns it)."""

from __future__ import annotations

from importlib import metadata

import mlflow
import numpy as np

from .inference import Predictor


def pip_requirements() -> list[str]:
    """Pinned to the versions this model was trained with (skips MLflow's slow inference)."""
    names = ["torch", "torchvision", "timm", "FrEIA", "numpy", "pillow", "pyyaml", "scikit-learn", "mlflow"]
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


class FastFlowPyfunc(mlflow.pyfunc.PythonModel):
    """Input: uint8 RGB images `(N,H,W,3)`. Output: dict of `scores (N,)`, `normalized_scores (N,)`,
    `is_anomalous (N,)` and `anomaly_maps (N,S,S)` at the model's input size."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_file(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        result = self.predictor.predict_array(np.asarray(model_input))
        return {"scores": result.scores, "normalized_scores": result.normalized,
                "is_anomalous": result.is_anomalous, "anomaly_maps": result.maps}
