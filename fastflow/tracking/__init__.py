"""Tracking: the MLflow store, lineage, the run logger, run lifecycle, reading results back, owners, invariants,
the registry (promotion) and the UI. May import runtime, data, core, engine and pages; the one layer that talks to MLflow."""

import logging
import os

# Before any module of this package imports mlflow:
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # its "View run at <uri>" lines carry credentials
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # no pickled model is ever loaded here
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar per download on stderr
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its tracebacks: faults are one line (faults.py)
