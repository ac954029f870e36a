"""Run lifecycle: a run that always ends (`start_run`), a study's parent run, run descriptions, and the runs that
stand for trials whose worker died, reports and peer results."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator, Optional
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from fastflow.pages.visualize import close_figure
from fastflow.runtime.config import RunConfig
from fastflow.runtime.faults import StoreError, describe, fault_of, store_error
from fastflow.runtime.redact import redact
from fastflow.runtime.signals import Interrupted, received as received_signal
from fastflow.tracking.lineage import lineage_tags
from fastflow.tracking.logger import TEST_SCORES, MlflowTracker, log_pixel_counts
from fastflow.tracking.names import check_names
from fastflow.tracking.owners import OWNER_TAG, owner_tags
from fastflow.tracking.store import STORE, connect, ensure_experiment, quoted, store_guard, tracking_uri

log = logging.getLogger(__name__)


@contextlib.contextmanager
def start_run(cfg: RunConfig, run_name: str = "", parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> Iterator[MlflowTracker]:
    """An MLflow run that always ends: FINISHED, FAILED (error tagged) or KILLED (Ctrl-C). Names MLflow would refuse
    stop it before the run exists (`names.check_names`). A fault of the store
    (disk full, read-only, server unreachable) is one `StoreError` line naming it; a run the fault leaves RUNNING
    is closed by the next command on this host (owners)."""
    check_names(cfg.data.category, cfg.tracking.experiment, run_name or cfg.tracking.run_name)
    uri = tracking_uri(cfg.tracking.uri)
    with store_guard(uri):
        experiment_id = ensure_experiment(cfg.tracking.experiment, uri)
        # tag values must be strings: the REST store (mlflow server) rejects ints/floats that sqlite stores accept
        all_tags = {**lineage_tags(), **owner_tags(),
                    **{key: redact(str(value)) for key, value in (tags or {}).items()}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = MlflowClient().create_run(experiment_id, run_name=run_name or cfg.tracking.run_name or None,
                                           tags=all_tags).info.run_id
    try:
        yield MlflowTracker(run_id)
    except KeyboardInterrupt as error:
        _close(run_id, "KILLED", interruption_note(error))
        raise
    except BaseException as error:
        signum = received_signal()
        if signum is not None:  # cleanup replaced the signal's exception with its own error
            interrupted = Interrupted(signum)
            _close(run_id, "KILLED", interruption_note(interrupted))
            raise interrupted from error
        fault = store_error(error, {STORE: uri})
        if fault is not None:
            closed = _close(run_id, "FAILED", str(fault))
            raise StoreError(f"{fault}" + ("" if closed else f"; run {run_id} stays RUNNING until the next command "
                                                             "on this host closes it")) from None
        _close(run_id, getattr(error, "mlflow_status", "FAILED"), f"{type(error).__name__}: {error}")
        raise
    else:
        with store_guard(uri):
            end_run(run_id, "FINISHED")


def _close(run_id: str, status: str, note: str) -> bool:
    """`end_run`, unless the store fails too (a full disk, the server gone): then False, and the next command on
    this host closes the run (its owner is gone by then)."""
    try:
        end_run(run_id, status, note)
        return True
    except Exception as error:
        if not fault_of(error):
            raise
        log.debug("could not end run %s: %s", run_id, describe(error))
        return False


def interruption_note(error: KeyboardInterrupt) -> str:
    """The `error` tag of a run stopped by a signal: "interrupted" (Ctrl-C) or "terminated (SIGTERM)"."""
    return "terminated (SIGTERM)" if isinstance(error, Interrupted) and error.signum == signal.SIGTERM else "interrupted"


def end_run(run_id: str, status: str, error: str = "") -> None:
    client = MlflowClient()
    if error:
        client.set_tag(run_id, "error", redact(error)[:5000])
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def set_owner(run_id: str, owner: str) -> None:
    """Hand a run to another process (`host:pid:start`): a study's parent run left RUNNING for a running trial."""
    MlflowClient().set_tag(run_id, OWNER_TAG, owner)


def run_status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def find_parent_run(experiment: str, study_name: str) -> Optional[str]:
    """The parent run of a study by its tags (studies whose run id is not stored on the study)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    runs = MlflowClient().search_runs([experiment_id], max_results=1,
                                     filter_string=f"tags.study = {quoted(study_name)} and tags.role = 'study'")
    return runs[0].info.run_id if runs else None


def start_parent_run(experiment: str, study_name: str, tags: dict, run_id: Optional[str] = None) -> str:
    """Reopen the study's parent run `run_id` (status RUNNING), or create it; then (re)set its tags."""
    client = MlflowClient()
    experiment_id = ensure_experiment(experiment, tracking_uri())
    if run_id:
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=study_name,
                                   tags={"role": "study", "study": study_name, **lineage_tags()}).info.run_id
    for key, value in {**tags, **owner_tags()}.items():  # reopened: this process owns it now
        client.set_tag(run_id, key, redact(str(value)))
    return run_id


STUDY_PAGE = "study.html"


def finish_parent_run(run_id: str, figures: dict, metrics: dict[str, float], status: str, page: str = "") -> None:
    """Attach the study's figures, its HTML page (`study.html`) and best metrics, then end the parent run."""
    client = MlflowClient()
    for name, figure in figures.items():
        try:
            client.log_figure(run_id, figure, f"study/{name}")
        finally:
            close_figure(figure)
    if page:
        client.log_text(run_id, page, STUDY_PAGE)
    if metrics:
        MlflowTracker(run_id).log_metrics(metrics, step=0)
    end_run(run_id, status)


NOTE_TAG = "mlflow.note.content"  # a run's description: markdown at the top of its Overview


def set_descriptions(notes: dict[str, str]) -> None:
    """Set the description of each run id in `notes` (markdown; MLflow keeps 8000 characters)."""
    client = MlflowClient()
    for run_id, text in notes.items():
        client.set_tag(run_id, NOTE_TAG, redact(text))


def log_new_params(run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet (params never change: a resumed study whose settings differ keeps
    the first values and says so in the log)."""
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    for key, value in params.items():
        if key in logged and logged[key] != redact(str(value))[:6000]:
            log.warning("param %s stays %r on run %s (this invocation: %r)", key, logged[key], run_id, value)
    MlflowTracker(run_id).log_params({k: v for k, v in params.items() if k not in logged})


def log_peer_run(experiment: str, name: str, tags: dict, params: dict, metrics: dict[str, float],
                 history: dict[int, dict[str, float]], test_scores: dict, pixel_counts: tuple) -> str:
    """A FINISHED run for a result measured here with another implementation (benchmarks/side_by_side.py): its
    tags (`implementation`, protocol), params, best-epoch metrics, per-epoch `eval/*` history, per-image test scores
    and binned test pixels, as this project's runs log them, so `fastflow report` can place it beside them."""
    client = connect()
    run = client.create_run(ensure_experiment(experiment, tracking_uri()), run_name=name,
                            tags={k: redact(str(v)) for k, v in tags.items()})
    tracker = MlflowTracker(run.info.run_id)
    tracker.log_params(params)
    for epoch, values in sorted(history.items()):
        tracker.log_metrics({f"eval/{k}": v for k, v in values.items()}, step=epoch)
    tracker.log_metrics(metrics, step=int(metrics.get("best/epoch", 0)))
    client.log_dict(run.info.run_id, test_scores, TEST_SCORES)
    log_pixel_counts(client, run.info.run_id, pixel_counts)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_report_run(experiment: str, files: list[Path], metrics: dict[str, float], uri: str = "") -> str:
    """A FINISHED run named `report` (tag role=report) holding `files` under the artifact folder `report/`."""
    experiment_id = ensure_experiment(experiment, tracking_uri(uri))
    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name="report",
                               tags={"role": "report", **lineage_tags(), **owner_tags()}).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), "report")
    MlflowTracker(run_id).log_metrics(metrics, step=0)
    end_run(run_id, "FINISHED")
    return run_id


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def trial_runs(experiment: str, study_name: str, trial_number: int) -> list:
    """The runs tagged with this study's trial number (a worker may die before the trial knows its run id)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    query = f"tags.study = {quoted(study_name)} and tags.trial_number = '{trial_number}'"
    return list(MlflowClient().search_runs([experiment_id], filter_string=query, max_results=10))


def record_lost_run(experiment: str, run_name: str, parent_run_id: str, tags: dict, error: str) -> str:
    """A FAILED run standing for a trial whose worker died before creating its own run (one run per trial)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    all_tags = {**lineage_tags(), "mlflow.parentRunId": parent_run_id,
                **{key: redact(str(value)) for key, value in tags.items()}}
    run_id = MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    end_run(run_id, "FAILED", error)
    return run_id
