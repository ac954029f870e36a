"""Compatibility alias: pyfunc models logged before the layers became subpackages run `from fastflow.inference import
Predictor` (their copy of fastflow/mlflow_model.py); in a process that has already imported this package, that import
finds this module. The Predictor lives in fastflow/serve/inference.py."""

from fastflow.serve.inference import Predictor

__all__ = ["Predictor"]
