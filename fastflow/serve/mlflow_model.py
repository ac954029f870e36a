"""The MLflow pyfunc flavour of a trained FastFlow model, logged as a *model from code*.

MLflow stores this file with the model (not a pickle of an object): `mlflow.pyfunc.load_model` runs it, takes
the model from `mlflow.models.set_model`, and `load_context` reads the checkpoint as data (`weights_only`).
Run as a file by MLflow, not imported through the package, so its imports are absolute; where the project is
not installed the package comes with the model (`code_paths`). Never import this module: it sets MLflow's
current model (tracking.log_pyfunc_model passes its path).
"""

from __future__ import annotations

import mlflow
import numpy as np

from fastflow.serve.inference import Predictor


class FastFlowPyfunc(mlflow.pyfunc.PythonModel):
    """Input: uint8 RGB images `(N,H,W,3)`. Output: dict of `scores (N,)`, `normalized_scores (N,)`,
    `is_anomalous (N,)` and `anomaly_maps (N,S,S)` at the model's input size."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_file(context.artifacts["checkpoint"])

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:  # ndarray: no MLflow type-hint notice
        result = self.predictor.predict_array(np.asarray(model_input))
        return {"scores": result.scores, "normalized_scores": result.normalized,
                "is_anomalous": result.is_anomalous, "anomaly_maps": result.maps}


mlflow.models.set_model(FastFlowPyfunc())
