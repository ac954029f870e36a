"""Optuna study runner: one study per (category, space) in RDB storage, one nested MLflow run per trial.

The runner creates storage, experiment, study and the parent run before any worker starts (first
creation races otherwise); workers are separate processes on the same study. Heartbeats turn a
killed worker's trial into FAIL (its MLflow run FAILED) and enqueue a retry.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .config import with_overrides
from .paper import paper_numbers
from .protocol import LEAK_FREE, OBJECTIVES, Protocol, protocol_for_metric, protocol_for_objective
from .selection import Fidelity, fidelity
from .registry import Promotion, promote
from .space import SearchSpace, load_space, nested
from .tracking import (end_run, ensure_experiment, find_parent_run, finish_parent_run, run_status,
                       start_parent_run, start_run, tracking_uri)
from .train import train_and_evaluate

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PARENT_ATTR = "mlflow_parent_run_id"
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
        if self.storage:
            return self.storage
        if os.environ.get("OPTUNA_STORAGE"):
            return os.environ["OPTUNA_STORAGE"]
        Path("mlruns").mkdir(exist_ok=True)
        return f"sqlite:///{Path('mlruns').resolve() / 'optuna.db'}"


class PrunedTrial(optuna.TrialPruned):
    mlflow_status = "KILLED"


def _mark_stale_run_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): fail its MLflow run, then retry it once."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id and run_status(run_id) == "RUNNING":
        end_run(run_id, "FAILED", "worker died (Optuna heartbeat lost)")
    RetryFailedTrialCallback(max_retry=1)(study, trial)


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
    tags = {"study": settings.resolved_study_name(), "storage": _redact(settings.storage_url()),
            "category": settings.category, "space": str(settings.space_path), "objective": settings.metric,
            "selection_protocol": settings.protocol.label}
    known = study.user_attrs.get(PARENT_ATTR) or find_parent_run(settings.experiment, study.study_name)
    deadline = time.monotonic() + (0 if created or known else wait_seconds)
    while known is None and PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    run_id = start_parent_run(settings.experiment, study.study_name, tags, known or study.user_attrs.get(PARENT_ATTR))
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def make_objective(settings: SweepSettings, space: SearchSpace, parent_run_id: str):
    def objective(trial: optuna.Trial) -> float:
        sampled = {name: dist.suggest(trial, name) for name, dist in space.params.items()}
        forced = {**settings.extra_fixed, "tracking.experiment": settings.experiment,
                  "eval.selection_metric": settings.metric}
        cfg = with_overrides(space.trial_config(sampled, settings.category, settings.root), nested(forced))
        tags = {"trial_number": trial.number, "study": settings.resolved_study_name(),
                **{f"sampled.{k}": v for k, v in sampled.items()}}
        with start_run(cfg, run_name=f"trial-{trial.number:03d}", parent_run_id=parent_run_id, tags=tags) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)

            running_best = [float("-inf")]

            def report(epoch: int, metrics: dict[str, float]) -> None:
                # the pruner sees what the objective returns: the best so far, so a one-epoch dip prunes nothing
                running_best[0] = max(running_best[0], metrics[f"eval/{settings.metric}"])
                trial.report(running_best[0], epoch)
                if trial.should_prune():
                    tracker.set_tags({"pruned": "true", "pruned_at_epoch": epoch})
                    raise PrunedTrial(f"pruned at epoch {epoch}")

            result = train_and_evaluate(cfg, tracker, report)
            for key in ("image_auroc", "pixel_auroc", "aupro", "val_image_auroc", "val_pixel_auroc", "val_aupro"):
                if f"eval/{key}" in result.best_metrics:
                    trial.set_user_attr(key, result.best_metrics[f"eval/{key}"])
            trial.set_user_attr("best_epoch", result.best_epoch)
            return result.best_metrics[f"eval/{settings.metric}"]

    return objective


def run_worker(settings: SweepSettings, parent_run_id: str, n_trials: int, worker: int = 0) -> None:
    """One worker process: `n_trials` trials of the shared study; failures are recorded, not fatal."""
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    space = load_space(settings.space_path)
    study = load_study(settings, space, worker)
    study.optimize(make_objective(settings, space, parent_run_id), n_trials=n_trials, timeout=settings.timeout,
                   catch=(Exception,), gc_after_trial=True)


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


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Prepare storage/experiment/study/parent run, run the workers, summarize on the parent run."""
    space = load_space(settings.space_path)
    ensure_experiment(settings.experiment, tracking_uri())
    parent_run_id = parent_run(settings, space)
    optuna.storages.fail_stale_trials(load_study(settings, space))
    status = "FINISHED"
    try:
        per_worker = [n for n in split_trials(settings.trials, settings.workers) if n > 0]
        if len(per_worker) == 1:
            run_worker(settings, parent_run_id, per_worker[0])
        else:
            _run_processes(settings, parent_run_id, per_worker)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = load_study(settings, space)
        optuna.storages.fail_stale_trials(study)
        study_fidelity = trial_fidelity(study)
        finish_parent_run(parent_run_id, study_figures(study), {**_best_metrics(study, settings.metric),
                          **(study_fidelity.metrics() if study_fidelity else {})}, status)
    result = SweepResult(settings.resolved_study_name(), parent_run_id, _best_trial(study), _counts(study),
                         fidelity=study_fidelity)
    if settings.promote and result.best_trial is not None:
        result.promotion = promote(settings.category, settings.metric, settings.experiment,
                                   run_id=result.best_trial.user_attrs["mlflow_run_id"])
    return result


def _run_processes(settings: SweepSettings, parent_run_id: str, per_worker: list[int]) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(settings, parent_run_id, n, i))
                 for i, n in enumerate(per_worker)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.join(timeout=30)
        raise


def _best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


def trial_fidelity(study: optuna.Study) -> Optional[Fidelity]:
    """Validation vs test image AUROC (each at its trial's selected epoch) across the complete trials;
    the selected trial is the study's best. None when the trials have no validation score."""
    best = _best_trial(study)
    rows = [t for t in study.trials if t.state == TrialState.COMPLETE
            and "val_image_auroc" in t.user_attrs and "image_auroc" in t.user_attrs]
    if best is None or best not in rows:
        return None
    return fidelity([t.user_attrs["val_image_auroc"] for t in rows], [t.user_attrs["image_auroc"] for t in rows],
                    rows.index(best))


def study_figures(study: optuna.Study) -> dict:
    """Optimization history, parameter importance and parallel coordinates (those computable now)."""
    from optuna.visualization import matplotlib as plots

    figures = {}
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures[f"{name}.png"] = plot(study).figure
        except Exception as error:  # e.g. importance needs >= 2 complete trials with varied params
            log.info("skipping %s: %s", name, error)
    return figures


def _best_metrics(study: optuna.Study, metric: str) -> dict[str, float]:
    best = _best_trial(study)
    if best is None:
        return {}
    values = {f"best/{k}": v for k, v in best.user_attrs.items() if isinstance(v, float)}
    return {**values, f"best/{metric}": best.value, "best/trial_number": best.number}


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _redact(url: str) -> str:
    """Hide a password in a database URL before it goes into a tag."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def summary_table(result: SweepResult, category: str, metric: str) -> str:
    """Plain-text table for the terminal: best params and AUROCs, with the paper's number when known."""
    lines = [f"study {result.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(result.counts.items()))]
    best = result.best_trial
    if best is None:
        return "\n".join(lines + ["no trial completed"])
    lines.append(f"best trial #{best.number} ({metric} = {best.value:.4f}, epoch {best.user_attrs.get('best_epoch')}); "
                 f"selection: {protocol_for_metric(metric).label}")
    lines += [f"  {name:<24} {value}" for name, value in best.params.items()]
    paper = paper_numbers(category)
    lines.append(f"  {'':<24} {'ours':>8} {'paper':>8}")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        ours = best.user_attrs.get(key)
        theirs = paper.get(key) if paper else None
        lines.append(f"  {key:<24} {ours if ours is None else f'{ours:.4f}':>8} "
                     f"{'-' if theirs is None else f'{theirs:.3f}':>8}")
    for key in ("val_image_auroc", "val_pixel_auroc", "val_aupro"):
        if key in best.user_attrs:
            lines.append(f"  {key:<24} {best.user_attrs[key]:>8.4f} {'-':>8}")
    lines.append("  (ours: test set at the selected epoch; val_*: held-out normals + synthetic anomalies)")
    if paper:
        lines.append("  (paper: CaiT per-category numbers, test-set selection)")
    lines.append(fidelity_line(result.fidelity, "complete trials"))
    return "\n".join(lines)


def fidelity_line(figures: Optional[Fidelity], over: str) -> str:
    """How far the selection can be trusted, in words and numbers, for the terminal."""
    if figures is None:
        return "selection fidelity: n/a (no validation score: no held-out normals)"
    rho = "n/a (fewer than 3 points or a constant score)" if math.isnan(figures.spearman) else f"{figures.spearman:+.2f}"
    return (f"selection fidelity over {figures.points} {over}: Spearman(val, test image AUROC) {rho}; "
            f"optimism {figures.optimism:.4f} (test AUROC of the test-best minus the chosen)")
