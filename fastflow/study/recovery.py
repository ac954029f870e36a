"""Recovery of trials whose worker died: close the trial so that its state and its one MLflow run agree, and
retry it once (at once when the worker ran on this host, else when Optuna's heartbeat goes stale)."""

from __future__ import annotations

import logging

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from fastflow.engine.protocol import RANKED_METRICS
from fastflow.runtime.signals import is_dead
from fastflow.tracking.runs import end_run, get_run, record_lost_run, trial_runs

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment"
OWNER_ATTR = "worker"  # host:pid:start of the process running the trial
RETRY_ATTR = "retry_of"
ENDED_ATTR = "objective_ended"  # set by the worker when its objective returns or raises: absent if it died inside


def _retry_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the trial's parameters again, once (a retry carries none of the dead trial's attributes)."""
    if RETRY_ATTR not in trial.user_attrs and trial.params:
        study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})


def _runs_of(study: optuna.Study, trial: FrozenTrial, experiment: str) -> list:
    run_id = trial.user_attrs.get("mlflow_run_id")
    return [get_run(run_id)] if run_id else trial_runs(experiment, study.study_name, trial.number)


def _fail_runs(study: optuna.Study, trial: FrozenTrial, experiment: str, parent_run_id: str, reason: str) -> None:
    """End the trial's RUNNING (or FINISHED but unrecorded) run FAILED; create a FAILED one if it had none."""
    runs = _runs_of(study, trial, experiment)
    for run in runs:
        if run.info.status in ("RUNNING", "FINISHED"):
            end_run(run.info.run_id, "FAILED", reason)
    if not runs and parent_run_id:
        record_lost_run(experiment, f"trial-{trial.number:03d}", parent_run_id,
                        {"trial_number": trial.number, "study": study.study_name}, reason)


def mark_stale_run_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died; Optuna already set it FAIL): fail its MLflow run, retry once."""
    _fail_runs(study, trial, study.user_attrs.get(EXPERIMENT_ATTR, "fastflow"), study.user_attrs.get(PARENT_ATTR, ""),
               "worker died (Optuna heartbeat lost)")
    _retry_once(study, trial)


def close_dead_trial(study: optuna.Study, trial: FrozenTrial, metric: str, reason: str) -> TrialState:
    """Close a RUNNING trial whose worker is gone, so trial and run agree: a FINISHED run completes the trial
    with its logged value; a pruned (KILLED) run prunes it; otherwise the trial FAILs, its run is FAILED and
    the trial is retried once. Returns the state set (or found, when another process closed it first)."""
    experiment = study.user_attrs.get(EXPERIMENT_ATTR, "fastflow")
    runs = _runs_of(study, trial, experiment)
    finished = [r for r in runs if r.info.status == "FINISHED" and f"best/{metric}" in r.data.metrics]
    pruned = [r for r in runs if r.info.status == "KILLED" and r.data.tags.get("pruned") == "true"]
    storage = study._storage
    try:
        if finished:
            metrics = finished[0].data.metrics
            storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", finished[0].info.run_id)
            for key in RANKED_METRICS + ("epoch",):
                if f"best/{key}" in metrics:
                    storage.set_trial_user_attr(trial._trial_id, "best_epoch" if key == "epoch" else key,
                                                int(metrics[f"best/{key}"]) if key == "epoch" else metrics[f"best/{key}"])
            storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [metrics[f"best/{metric}"]])
            return TrialState.COMPLETE
        if pruned:
            storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED)
            return TrialState.PRUNED
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:  # closed meanwhile by another process
        return storage.get_trial(trial._trial_id).state
    _fail_runs(study, trial, experiment, study.user_attrs.get(PARENT_ATTR, ""), reason)
    _retry_once(study, storage.get_trial(trial._trial_id))
    return TrialState.FAIL


def close_orphaned_trials(study: optuna.Study, metric: str, owners: tuple[str, ...] = ()) -> list[FrozenTrial]:
    """Close RUNNING trials whose worker process on this host is dead, or whose owner is one of `owners`
    (this process, after its optimize loop ended). Returns the trials closed."""
    closed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR, "")
        if owner and (owner in owners or is_dead(owner)):
            reason = f"worker {owner} died" if owner not in owners else "worker stopped during the trial"
            state = close_dead_trial(study, trial, metric, reason)
            log.warning("trial #%d (worker %s) closed as %s", trial.number, owner, state.name)
            closed.append(trial)
    return closed
