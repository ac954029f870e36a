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
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .config import ConfigError, with_overrides
from .paper import paper_numbers
from .protocol import (LEAK_FREE, OBJECTIVES, RANKED_METRICS, Protocol, protocol_for_metric,
                       protocol_for_objective, ranking_key)
from .redact import redact
from .selection import Fidelity, fidelity, fidelity_line, split_half_reliability
from .registry import Promotion, promote
from .signals import check as check_signals, install as install_signal_policy, is_dead, process_identity
from .space import SearchSpace, choose_space, load_space, nested
from .metrics import image_auroc_interval
from .model_card import run_link
from .study_note import Champion, study_description, terminal_summary, trial_description
from .study_page import TrialRow, figure_png, render_study_page, trial_rows
from .tracking import (BEST_HEATMAPS, child_run_summaries, end_run, ensure_experiment, find_parent_run,
                       finish_parent_run, get_run, log_new_params, read_artifact, read_test_scores, record_lost_run,
                       server_url, set_descriptions, set_owner, start_parent_run, start_run, tracking_uri, trial_runs)
from .train import train_and_evaluate
from .visualize import tidy_study_figure

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment"
OWNER_ATTR = "worker"  # host:pid:start of the process running the trial
RETRY_ATTR = "retry_of"
ENDED_ATTR = "objective_ended"  # set by the worker when its objective returns or raises: absent if it died inside
OBJECTIVE_ATTR = "objective"
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30


@dataclass(frozen=True)
class SweepSettings:
    space_path: Path
    category: str
    root: str
    trials: int
    workers: int = 1
    study_name: str = ""
    timeout: Optional[float] = None
    objective: str = LEAK_FREE.objective  # val (leak-free, default) | test (paper protocol)
    storage: str = ""
    seed: int = 0
    experiment: str = "fastflow"
    heartbeat: int = HEARTBEAT_SECONDS
    grace: int = GRACE_SECONDS
    extra_fixed: dict = field(default_factory=dict)  # 'section.key' -> value, wins over the space
    promote: bool = True  # register the best trial's model and move @champion if it improved

    @property
    def protocol(self) -> Protocol:
        return protocol_for_objective(self.objective)

    @property
    def metric(self) -> str:
        return self.protocol.metric

    def resolved_study_name(self) -> str:
        return self.study_name or f"fastflow-{self.category}-{Path(self.space_path).stem}"

    def storage_url(self) -> str:
        return self.storage or default_storage()


def default_storage() -> str:
    """$OPTUNA_STORAGE, else `sqlite:///mlruns/optuna.db`."""
    if os.environ.get("OPTUNA_STORAGE"):
        return os.environ["OPTUNA_STORAGE"]
    Path("mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{Path('mlruns').resolve() / 'optuna.db'}"


class PrunedTrial(optuna.TrialPruned):
    mlflow_status = "KILLED"


class TrialError(RuntimeError):
    """A trial's failure as Optuna records and logs it: `<type>: <message>`, secrets masked."""


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


def _mark_stale_run_failed(study: optuna.Study, trial: FrozenTrial) -> None:
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


def _inferred_objective(study: optuna.Study) -> Optional[str]:
    """The objective of a study from before it was stored: the one whose metric equals its trials' values."""
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            matches = [o for o in OBJECTIVES if trial.user_attrs.get(protocol_for_objective(o).metric) == trial.value]
            if len(matches) == 1:
                return matches[0]
    return None


def make_storage(settings: SweepSettings) -> RDBStorage:
    return RDBStorage(settings.storage_url(), heartbeat_interval=settings.heartbeat, grace_period=settings.grace,
                      heartbeat_stale_trial_callback=_mark_stale_run_failed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)  # epochs count from 1: never prune before epoch 2


def load_study(settings: SweepSettings, space: SearchSpace, worker: int = 0) -> optuna.Study:
    """Create or resume the study. TPE's seed mixes the worker index, the trials so far and the host,
    so parallel workers, other machines and resumed runs do not replay the same start-up suggestions."""
    study, _ = _create_or_load(settings, space)
    host = zlib.crc32(socket.gethostname().encode()) % 10_000
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + 1000 * worker + len(study.trials) + host)
    return study


def _create_or_load(settings: SweepSettings, space: SearchSpace) -> tuple[optuna.Study, bool]:
    """(study, created by this call) — the database's unique study name decides who created it."""
    kwargs = dict(study_name=settings.resolved_study_name(), storage=make_storage(settings))
    try:
        study = optuna.create_study(direction="maximize", pruner=make_pruner(space.pruner), **kwargs)
        study.set_user_attr(OBJECTIVE_ATTR, settings.objective)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(pruner=make_pruner(space.pruner), **kwargs)
        check_objective(study, settings)
        return study, False


def check_objective(study: optuna.Study, settings: SweepSettings) -> None:
    """The objective is part of a study's identity: values of two objectives are not comparable."""
    stored = study.user_attrs.get(OBJECTIVE_ATTR) or _inferred_objective(study)
    if stored is None:  # a study from before the objective was stored, with no complete trial: adopt this one
        study.set_user_attr(OBJECTIVE_ATTR, settings.objective)
    elif stored != settings.objective:
        raise ValueError(f"study '{study.study_name}' optimizes --objective {stored} "
                         f"({protocol_for_objective(stored).label}); it cannot be resumed with --objective "
                         f"{settings.objective}. Resume it with --objective {stored}, or start another study "
                         f"with --study <new name>")


def parent_run(settings: SweepSettings, space: SearchSpace, wait_seconds: float = 120.0) -> str:
    """The study's one MLflow parent run. Its creator stores the id on the study; processes that
    merely load the study wait for it, so workers started together never create two parents."""
    study, created = _create_or_load(settings, space)
    tags = {"study": settings.resolved_study_name(), "storage": redact(settings.storage_url()),
            "category": settings.category, "space": str(settings.space_path), "objective": settings.metric,
            "selection_protocol": settings.protocol.label}
    known = study.user_attrs.get(PARENT_ATTR) or find_parent_run(settings.experiment, study.study_name)
    deadline = time.monotonic() + (0 if created or known else wait_seconds)
    while known is None and PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    run_id = start_parent_run(settings.experiment, study.study_name, tags, known or study.user_attrs.get(PARENT_ATTR))
    log_new_params(run_id, study_params(settings, space))
    study.set_user_attr(PARENT_ATTR, run_id)
    study.set_user_attr(EXPERIMENT_ATTR, settings.experiment)
    study.set_metric_names([objective_name(settings.protocol)])  # optuna-dashboard's name for the objective
    return run_id


def study_params(settings: SweepSettings, space: SearchSpace) -> dict[str, str]:
    """The parent run's params: the search space (`space.<key>`), the values every trial gets (`fixed.<key>`) and
    the study's settings (`study.*`)."""
    params = {f"space.{name}": dist.describe() for name, dist in space.params.items()}
    params.update({f"fixed.{key}": value for key, value in {**space.fixed, **settings.extra_fixed}.items()})
    params.update({"study.name": settings.resolved_study_name(), "study.space_file": str(settings.space_path),
                   "study.category": settings.category, "study.data_root": settings.root,
                   "study.objective": f"maximize {settings.metric} ({settings.protocol.label})",
                   "study.ranking": " > ".join(settings.protocol.ranking),
                   "study.sampler": f"TPE, seed {settings.seed} (+ worker, trials so far, host)",
                   "study.pruner": space.pruner})
    return params


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


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    best_trial: Optional[FrozenTrial]
    counts: dict[str, int]
    promotion: Optional[Promotion] = None
    fidelity: Optional[Fidelity] = None  # validation vs test image AUROC across the complete trials
    rows: list[TrialRow] = field(default_factory=list)  # every trial, best first (`study_page.trial_rows`)


class WorkerDiedError(RuntimeError):
    """A sweep worker process ended abnormally (killed, crashed); its trial was closed and retried."""


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Prepare storage/experiment/study/parent run, run the workers, summarize on the parent run."""
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
        study_fidelity = trial_fidelity(study, settings.protocol)
        rows = study_rows(study, settings.protocol, parent_run_id)
        _finish_parent_if_idle(study, settings, parent_run_id, status, study_fidelity, rows)
    if dead:
        raise WorkerDiedError(_death_message(dead, study.trials))
    result = SweepResult(settings.resolved_study_name(), parent_run_id, best_trial(study, settings.protocol),
                         _counts(study), fidelity=study_fidelity, rows=rows)
    if settings.promote and result.best_trial is not None:
        result.promotion = promote(settings.category, settings.metric, settings.experiment,
                                   run_id=result.best_trial.user_attrs["mlflow_run_id"])
        describe_runs(settings, parent_run_id, rows, result.promotion, study_fidelity)
    return result


def _finish_parent_if_idle(study: optuna.Study, settings: SweepSettings, parent_run_id: str, status: str,
                           study_fidelity: Optional[Fidelity], rows: list[TrialRow]) -> None:
    """Attach figures, study page and best metrics and end the parent run, unless a trial still runs
    (another machine's worker ends it when it finishes); describe the parent and trial runs either way."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
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
        page = study_page(study, settings, figures, rows)
    except Exception as error:  # the page is a view: never leave the parent run RUNNING over it
        log.warning("no study page: %s: %s", type(error).__name__, error)
        page = ""
    metrics = {**_best_metrics(study, settings.protocol), **(study_fidelity.metrics() if study_fidelity else {})}
    finish_parent_run(parent_run_id, figures, metrics, status, page)
    describe_runs(settings, parent_run_id, rows, None, study_fidelity)


def describe_runs(settings: SweepSettings, parent_run_id: str, rows: list[TrialRow],
                  promotion: Optional[Promotion] = None, study_fidelity: Optional[Fidelity] = None) -> None:
    """The descriptions MLflow shows atop each Overview: the parent run's (ranked trials with links, champion and
    how to load it) and each trial's (rank, objective, state, best epoch). A view: failures are only logged."""
    champion = (Champion(promotion.name, promotion.version, promotion.promoted, promotion.champion)
                if promotion is not None else None)
    try:
        experiment_id = get_run(parent_run_id).info.experiment_id
        parent_link = run_link(experiment_id, parent_run_id)
        study_name, protocol = settings.resolved_study_name(), settings.protocol
        complete = sum(row.state == "complete" for row in rows)
        notes = {row.run_id: trial_description(row, protocol, complete, study_name, parent_link, champion)
                 for row in rows if row.run_id}
        notes[parent_run_id] = study_description(study_name, settings.category, protocol, rows, experiment_id,
                                                 parent_run_id, champion, fidelity_line(study_fidelity, "complete trials"))
        set_descriptions(notes)
    except Exception as error:
        log.warning("run descriptions not written: %s: %s", type(error).__name__, error)


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


def objective_name(protocol: Protocol) -> str:
    """The objective's name in Optuna and on the study figures, e.g. `image_auroc (test set (paper protocol))`."""
    return f"{protocol.metric} ({protocol.label})"


def trial_rank(trial: FrozenTrial, protocol: Protocol) -> tuple[float, ...]:
    """The objective, then the protocol's tie-breaking metrics (stored on the trial); larger is better."""
    return ranking_key({**trial.user_attrs, protocol.metric: trial.value}, protocol)


def best_trial(study: optuna.Study, protocol: Protocol) -> Optional[FrozenTrial]:
    """The best complete trial by `protocol.ranking`; among exact ties the earliest."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: trial_rank(t, protocol)) if complete else None


def trial_fidelity(study: optuna.Study, protocol: Protocol) -> Optional[Fidelity]:
    """Validation vs test image AUROC (each at its trial's selected epoch) across the complete trials, the
    selected trial being the study's best, and how reliably the test set ranks those trials (from each trial's
    per-image test scores). None when the trials have no validation score."""
    best = best_trial(study, protocol)
    rows = [t for t in study.trials if t.state == TrialState.COMPLETE
            and "val_image_auroc" in t.user_attrs and "image_auroc" in t.user_attrs]
    if best is None or best not in rows:
        return None
    figures = fidelity([t.user_attrs["val_image_auroc"] for t in rows], [t.user_attrs["image_auroc"] for t in rows],
                       rows.index(best))
    scores = [read_test_scores(t.user_attrs["mlflow_run_id"]) for t in rows]
    if any(s is None for s in scores) or len({tuple(s["images"]) for s in scores}) != 1:
        return figures  # a trial without per-image scores, or on other test images: no reliability
    return replace(figures, test_reliability=split_half_reliability(scores[0]["labels"], [s["scores"] for s in scores]))


def study_figures(study: optuna.Study, protocol: Protocol) -> dict:
    """Optimization history, parameter importance and parallel coordinates (those computable now)."""
    from optuna.visualization import matplotlib as plots

    figures = {}
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = f"{protocol.metric} ({protocol.name})"
                figures[f"{name}.png"] = tidy_study_figure(name, plot(study, target_name=target), protocol.label, target)
        except Exception as error:  # e.g. importance needs >= 2 complete trials with varied params
            log.info("skipping %s: %s", name, error)
    return figures


def study_rows(study: optuna.Study, protocol: Protocol, parent_run_id: str) -> list[TrialRow]:
    """Every trial with its run's figures and intervals, best first. A complete run logged before intervals were
    gets its test image AUROC's interval from its per-image test scores (`test_scores.json`), when it has them."""
    rows = trial_rows(study.trials, child_run_summaries(parent_run_id), protocol)
    for row in rows:
        if row.state == "complete" and row.run_id and "image_auroc" not in row.intervals:
            scores = read_test_scores(row.run_id)
            try:
                row.intervals["image_auroc"] = image_auroc_interval(scores["labels"], scores["scores"])
            except (TypeError, KeyError, ValueError):  # no scores, or a single class
                continue
    return rows


def study_page(study: optuna.Study, settings: SweepSettings, figures: dict, rows: list[TrialRow]) -> str:
    """The HTML study page for the parent run: trials ranked, their runs, the champion's heatmaps, the figures."""
    best = best_trial(study, settings.protocol)
    heatmaps = read_artifact(best.user_attrs["mlflow_run_id"], BEST_HEATMAPS) if best is not None else None
    return render_study_page(study.study_name, settings.category, settings.protocol, rows,
                             best.number if best is not None else None, heatmaps,
                             {name: figure_png(figure) for name, figure in figures.items()}, server_url())


def _best_metrics(study: optuna.Study, protocol: Protocol) -> dict[str, float]:
    best = best_trial(study, protocol)
    if best is None:
        return {}
    values = {f"best/{k}": v for k, v in best.user_attrs.items() if isinstance(v, float)}
    return {**values, f"best/{protocol.metric}": best.value, "best/trial_number": best.number}


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def summary_table(result: SweepResult, category: str, metric: str) -> str:
    """Plain-text table for the terminal: best params and figures (AUROCs with intervals), the paper's numbers."""
    return terminal_summary(result.study_name, result.rows, protocol_for_metric(metric), paper_numbers(category),
                            fidelity_line(result.fidelity, "complete trials"))
