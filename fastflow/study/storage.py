"""A sweep's settings and its storage: the Optuna study (created once, resumed with the same objective), its
sampler and pruner, and the study's one MLflow parent run."""

from __future__ import annotations

import os
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from fastflow.engine.protocol import LEAK_FREE, OBJECTIVES, Protocol, protocol_for_objective
from fastflow.runtime.redact import redact
from fastflow.runtime.sqlite_store import open_sqlite
from fastflow.study.recovery import EXPERIMENT_ATTR, PARENT_ATTR, mark_stale_run_failed
from fastflow.study.space import SearchSpace
from fastflow.tracking.runs import find_parent_run, log_new_params, start_parent_run

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
OBJECTIVE_ATTR = "objective"
STORAGE = "Optuna storage"  # how errors name it (faults.py)
SCHEMA_TABLE = "studies"  # a table every Optuna storage has: a database without it is not one
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


def _inferred_objective(study: optuna.Study) -> Optional[str]:
    """The objective of a study from before it was stored: the one whose metric equals its trials' values."""
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            matches = [o for o in OBJECTIVES if trial.user_attrs.get(protocol_for_objective(o).metric) == trial.value]
            if len(matches) == 1:
                return matches[0]
    return None


def make_storage(settings: SweepSettings) -> RDBStorage:
    """The study's storage; a sqlite file is checked first and its schema created once among racing processes
    (`sqlite_store.open_sqlite`): a damaged, empty or foreign file is one `StoreError` line, left as it is."""
    url = settings.storage_url()
    return open_sqlite(url, STORAGE, SCHEMA_TABLE, lambda: RDBStorage(
        url, heartbeat_interval=settings.heartbeat, grace_period=settings.grace,
        heartbeat_stale_trial_callback=mark_stale_run_failed))


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


def objective_name(protocol: Protocol) -> str:
    """The objective's name in Optuna and on the study figures, e.g. `image_auroc (test set (paper protocol))`."""
    return f"{protocol.metric} ({protocol.label})"
