"""Every MLflow run has an owner: the process running it (`host:pid:start`, tag `owner`), as sweep trials record
their worker. A run whose owner is gone without ending it (SIGKILL, out of memory, a FAILED update that failed on
a full disk) is closed by the next command on that host: FAILED with tag `error=killed`.

Runs owned on another host are left alone (their process cannot be checked from here).
"""

from __future__ import annotations

import logging
import socket

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from fastflow.runtime.signals import is_dead, process_identity
from fastflow.tracking._search import all_runs

log = logging.getLogger(__name__)
OWNER_TAG = "owner"
KILLED = "killed"  # the `error` tag of a run closed because its owner died


def owner_tags() -> dict[str, str]:
    """The tags that make this process a new run's owner."""
    return {OWNER_TAG: process_identity()}


def _running_runs_of_this_host(client: MlflowClient) -> list:
    host = socket.gethostname().replace("'", "")
    query = f"attributes.status = 'RUNNING' and tags.{OWNER_TAG} LIKE '{host}:%'"
    return all_runs(client, [experiment.experiment_id for experiment in client.search_experiments()], query)


def close_dead_runs(client: MlflowClient) -> list[str]:
    """End FAILED (`error=killed`) every RUNNING run whose owner was a process of this host that is gone.
    Returns the ids of the runs closed."""
    closed = []
    for run in _running_runs_of_this_host(client):
        owner = run.data.tags.get(OWNER_TAG, "")
        if is_dead(owner):
            client.set_tag(run.info.run_id, "error", KILLED)
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FAILED))
            log.warning("run %s (%s) was left RUNNING by process %s, which is gone: marked FAILED",
                        run.info.run_id, run.info.run_name, owner)
            closed.append(run.info.run_id)
    return closed


__all__ = ["OWNER_TAG", "KILLED", "owner_tags", "close_dead_runs"]
