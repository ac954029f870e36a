"""Optuna study runner: one study per (category, space) in RDB storage, one nested MLflow run per trial.

The runner creates storage, experiment, study and the parent run before any worker starts (first
creation races otherwise); workers are separate processes on the same study.

A worker records `host:pid:start` on each trial it runs (user attr `worker`). A trial whose worker died
is closed so that its state and its one MLflow run agree, and retried once: at once when the worker ran on
this host (its pid is gone), else when Optuna's heartbeat goes stale. A sweep whose worker died exits
non-zero naming the trial; the parent run ends only when the study has no running trial (several machines).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from typing import Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from fastflow.engine.protocol import RANKED_METRICS
from fastflow.engine.selection import Fidelity
from fastflow.engine.train import train_and_evaluate
from fastflow.pages.study_page import TrialRow
from fastflow.runtime.config import ConfigError, with_overrides
from fastflow.runtime.redact import redact
from fastflow.runtime.signals import check as check_signals, install as install_signal_policy, process_identity
from fastflow.study.recovery import ENDED_ATTR, OWNER_ATTR, close_orphaned_trials
from fastflow.study.space import SearchSpace, choose_space, load_space, nested
from fastflow.study.storage import SweepSettings, load_study, parent_run
from fastflow.study.summary import (SweepResult, best_trial, best_trial_metrics, describe_runs, state_counts, study_figures,
                                    study_page, study_rows, trial_fidelity)
from fastflow.tracking.names import check_names
from fastflow.tracking.registry import promote
from fastflow.tracking.runs import finish_parent_run, record_lost_run, set_owner, start_run
from fastflow.tracking.store import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)
class PrunedTrial(optuna.TrialPruned):
    mlflow_status = "KILLED"


class TrialError(RuntimeError):
    """A trial's failure as Optuna records and logs it: `<type>: <message>`, secrets masked."""


def make_objective(settings: SweepSettings, space: SearchSpace, parent_run_id: str):
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(OWNER_ATTR, process_identity())
        sampled = {name: dist.suggest(trial, name) for name, dist in space.params.items()}
        forced = {**settings.extra_fixed, "tracking.experiment": settings.experiment,
                  "eval.selection_metric": settings.metric}
        tags = {"trial_number": trial.number, "study": settings.resolved_study_name(),
                **{f"sampled.{k}": v for k, v in sampled.items()}}
        try:
            cfg = with_overrides(space.trial_config(sampled, settings.category, settings.root), nested(forced))
        except ConfigError as error:  # e.g. a sampled input size the backbone cannot take: one FAILED run says so
            run_id = record_lost_run(settings.experiment, f"trial-{trial.number:03d}", parent_run_id, tags,
                                     f"ConfigError: {error}")
            trial.set_user_attr("mlflow_run_id", run_id)
            raise
        with start_run(cfg, run_name=f"trial-{trial.number:03d}", parent_run_id=parent_run_id, tags=tags) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)

            running_best = [float("-inf")]

            def report(epoch: int, metrics: dict[str, float]) -> None:
                # the pruner sees what the objective returns: the best so far, so a one-epoch dip prunes nothing
                running_best[0] = max(running_best[0], metrics[f"eval/{settings.metric}"])
                trial.report(running_best[0], epoch)
                if epoch < cfg.train.epochs and trial.should_prune():  # never discard a finished training
                    tracker.set_tags({"pruned": "true", "pruned_at_epoch": epoch,  # the run name shows it too
                                      "mlflow.runName": f"trial-{trial.number:03d}-pruned"})
                    raise PrunedTrial(f"pruned at epoch {epoch}")

            result = train_and_evaluate(cfg, tracker, report)
            for key in RANKED_METRICS:
                if f"eval/{key}" in result.best_metrics:
                    trial.set_user_attr(key, result.best_metrics[f"eval/{key}"])
            trial.set_user_attr("best_epoch", result.best_epoch)
            return result.best_metrics[f"eval/{settings.metric}"]

    def masked(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # Optuna logs (and may store) the text: a data root's token must not reach it
            raise TrialError(redact(f"{type(error).__name__}: {error}")) from None
        finally:  # a marker only: a storage that fails here reports itself at Optuna's tell
            with contextlib.suppress(Exception):
                trial.set_user_attr(ENDED_ATTR, True)

    return masked


def run_worker(settings: SweepSettings, parent_run_id: str, n_trials: int, worker: int = 0) -> None:
    """One worker process: `n_trials` trials of the shared study; failures are recorded, not fatal."""
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    install_signal_policy()  # a spawned worker: SIGTERM from the runner ends its trial like Ctrl-C
    space = load_space(settings.space_path)
    study = load_study(settings, space, worker)
    try:
        study.optimize(make_objective(settings, space, parent_run_id), n_trials=n_trials, timeout=settings.timeout,
                       catch=(Exception,), gc_after_trial=True,
                       callbacks=[lambda study, trial: check_signals()])  # a dropped signal ends the sweep here
        check_signals()
    finally:  # a signal between a run's end and Optuna's tell leaves the trial RUNNING: close it now
        close_orphaned_trials(study, settings.metric, owners=(process_identity(),))


def split_trials(trials: int, workers: int) -> list[int]:
    return [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]


class WorkerDiedError(RuntimeError):
    """A sweep worker process ended abnormally (killed, crashed); its trial was closed and retried."""


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Prepare storage/experiment/study/parent run, run the workers, summarize on the parent run."""
    check_names(settings.category, settings.experiment)  # a name MLflow refuses fails here, not in every trial
    choose_space(settings.space_path, settings.category)  # weights that cannot be loaded stop it before any trial
    space = load_space(settings.space_path)
    ensure_experiment(settings.experiment, tracking_uri())
    parent_run_id = parent_run(settings, space)
    study = load_study(settings, space)
    close_orphaned_trials(study, settings.metric)  # workers of an earlier sweep on this host that died
    optuna.storages.fail_stale_trials(study)
    status, dead = "FINISHED", []
    try:
        per_worker = [n for n in split_trials(settings.trials, settings.workers) if n > 0]
        if len(per_worker) == 1:
            run_worker(settings, parent_run_id, per_worker[0])
        elif per_worker:
            dead = _run_processes(settings, parent_run_id, per_worker)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = load_study(settings, space)
        close_orphaned_trials(study, settings.metric)
        optuna.storages.fail_stale_trials(study)
        status = "FAILED" if dead and status == "FINISHED" else status
        trials = study.get_trials()  # one snapshot: racing workers finish trials meanwhile; counts must agree
        study_fidelity = trial_fidelity(trials, settings.protocol)
        rows = study_rows(trials, settings.protocol, parent_run_id)
        _finish_parent_if_idle(study, trials, settings, parent_run_id, status, study_fidelity, rows)
    if dead:
        raise WorkerDiedError(_death_message(dead, trials))
    result = SweepResult(settings.resolved_study_name(), parent_run_id, best_trial(trials, settings.protocol),
                         state_counts(trials), fidelity=study_fidelity, rows=rows)
    if settings.promote and result.best_trial is not None:
        result.promotion = promote(settings.category, settings.metric, settings.experiment,
                                   run_id=result.best_trial.user_attrs["mlflow_run_id"])
        describe_runs(settings, parent_run_id, rows, result.promotion, study_fidelity)
    return result


def _finish_parent_if_idle(study: optuna.Study, trials: list[FrozenTrial], settings: SweepSettings,
                           parent_run_id: str, status: str, study_fidelity: Optional[Fidelity],
                           rows: list[TrialRow]) -> None:
    """Attach figures, study page and best metrics and end the parent run, unless a trial still runs
    (another machine's worker ends it when it finishes); describe the parent and trial runs either way."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        log.warning("parent run %s stays RUNNING: trials %s still run elsewhere", parent_run_id,
                    ", ".join(f"#{t.number}" for t in running))
        owners = [t.user_attrs[OWNER_ATTR] for t in running if OWNER_ATTR in t.user_attrs]
        if owners:  # the parent is theirs now: closed FAILED if they die too, reopened by the next sweep
            set_owner(parent_run_id, owners[0])
        describe_runs(settings, parent_run_id, rows, None, study_fidelity)
        return
    figures = study_figures(study, settings.protocol)
    try:
        page = study_page(study, trials, settings, figures, rows)
    except Exception as error:  # the page is a view: never leave the parent run RUNNING over it
        log.warning("no study page: %s: %s", type(error).__name__, error)
        page = ""
    metrics = {**best_trial_metrics(trials, settings.protocol), **(study_fidelity.metrics() if study_fidelity else {})}
    finish_parent_run(parent_run_id, figures, metrics, status, page)
    describe_runs(settings, parent_run_id, rows, None, study_fidelity)


def _death_message(dead: list[tuple[int, str, int]], trials: list[FrozenTrial]) -> str:
    """Each dead worker with the trial it died in (its objective never ended), whichever process closed it: this
    runner, another worker or Optuna's heartbeat."""
    parts = []
    for index, identity, code in dead:
        running = [f"#{t.number}" for t in trials if t.user_attrs.get(OWNER_ATTR) == identity
                   and ENDED_ATTR not in t.user_attrs]
        how = f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"
        parts.append(f"worker {index} (pid {identity.split(':')[1]}) died ({how}) "
                     + (f"during trial {', '.join(running)}: closed (FAIL and its run FAILED, retry queued, unless its "
                        "run had already ended)" if running else "between trials"))
    return "; ".join(parts) + "; re-run the same command to continue the study"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _run_processes(settings: SweepSettings, parent_run_id: str, per_worker: list[int]) -> list[tuple[int, str, int]]:
    """Run the workers; returns (index, identity, exit code) of each worker that died (non-zero exit)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(settings, parent_run_id, n, i))
                 for i, n in enumerate(per_worker)]
    identities = []
    for process in processes:
        process.start()
        identities.append(process_identity(process.pid))
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:  # SIGTERM to the runner alone (timeout, docker stop) reaches the workers too
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
        raise
    return [(i, identity, p.exitcode) for i, (p, identity) in enumerate(zip(processes, identities)) if p.exitcode]


