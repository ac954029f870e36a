"""Reading runs back: a study's trial runs, FINISHED runs of an experiment (report, paper), and a run's artifacts
(per-image test scores, binned test pixels, the checkpoint)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Optional

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from fastflow.runtime.faults import describe
from fastflow.runtime.redact import redact
from fastflow.tracking._search import all_runs
from fastflow.tracking.logger import CHECKPOINT_ARTIFACT, TEST_PIXEL_COUNTS, TEST_SCORES
from fastflow.tracking.store import connect, quoted


def child_run_summaries(parent_run_id: str) -> dict[str, dict]:
    """run id -> {name, status, experiment_id, metrics (latest values), tags} of the parent's nested runs."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = all_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = {quoted(parent_run_id)}")
    return {run.info.run_id: {"name": run.info.run_name, "status": run.info.status,
                              "experiment_id": run.info.experiment_id, "metrics": dict(run.data.metrics),
                              "tags": dict(run.data.tags)} for run in runs}


def read_test_scores(run_id: str, artifact: str = TEST_SCORES) -> Optional[dict]:
    """A run's per-image test scores at its best epoch (`TEST_SCORES`; the kNN reference's: `REFERENCE_TEST_SCORES`),
    or None when it has none."""
    data = read_artifact(run_id, artifact)
    return json.loads(data) if data is not None else None


def read_pixel_counts(run_id: str, artifact: str = TEST_PIXEL_COUNTS) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A run's binned test pixels at its best epoch (`TEST_PIXEL_COUNTS`: normal, defect), or None. Read as plain
    arrays (no pickles)."""
    data = read_artifact(run_id, artifact)
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return arrays["normal"], arrays["defect"]


def download_checkpoint(run_id: str, folder: Path) -> Path:
    """The run's `CHECKPOINT_ARTIFACT` downloaded into `folder`; ValueError naming the run when it has none."""
    try:
        return Path(MlflowClient().download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(folder)))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise ValueError(f"run {run_id} has no readable {CHECKPOINT_ARTIFACT} artifact ({redact(describe(error))}); "
                         "only runs of `fastflow train`/`sweep` carry one") from None


def read_artifact(run_id: str, path: str) -> Optional[bytes]:
    """The bytes of a run's artifact, or None when it does not exist."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            return Path(MlflowClient().download_artifacts(run_id, path, folder)).read_bytes()
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def finished_runs(experiment: str, filter_string: str = "", uri: str = "") -> list:
    """Every FINISHED run of `experiment` matching `filter_string` (MLflow search syntax), newest first.

    An unknown experiment raises ValueError naming the experiments that exist.
    """
    client = connect(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"unknown experiment '{experiment}'; experiments: {', '.join(names) or 'none'} "
                         f"(tracking store {redact(mlflow.get_tracking_uri())})")
    query = " and ".join(q for q in ("attributes.status = 'FINISHED'", filter_string) if q)
    return all_runs(client, [found.experiment_id], query)
