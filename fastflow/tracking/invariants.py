"""Consistency checks of the stores after any command (used by the fault-injection test and `make chaos`).

Through the public MLflow and Optuna APIs (and, for sqlite stores, a read-only scan of their tables); each
check returns the violations it found as lines.
- no Optuna trial and no MLflow run is RUNNING;
- every started trial (not WAITING) has exactly one run, and their states agree: COMPLETE-FINISHED,
  PRUNED-KILLED, FAIL-FAILED (or KILLED with an interruption tag: the trial was stopped by a signal);
- no registered model has two versions from one run;
- `@champion` is the best version by `registry.best_version` (protocol ranking, tie: earlier version);
- no secret appears anywhere in the stores (every MLflow and Optuna object, every table of a sqlite store), in an
  artifact or in a log file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import optuna
from optuna.trial import TrialState

from fastflow.engine.protocol import protocol_for_metric
from fastflow.tracking._search import all_runs
from fastflow.tracking.registry import CHAMPION, best_version, model_versions
from fastflow.tracking.store import connect

AGREE = {TrialState.COMPLETE: {"FINISHED"}, TrialState.PRUNED: {"KILLED"}, TrialState.FAIL: {"FAILED", "KILLED"}}
INTERRUPTED = ("interrupted", "terminated (SIGTERM)")


def _all_runs(client) -> list:
    return all_runs(client, [experiment.experiment_id for experiment in client.search_experiments()])


def check_runs_and_trials(storage: str | None) -> list[str]:
    """RUNNING runs/trials, trials without exactly one run, and state disagreements."""
    client = connect(reap=False)
    runs = _all_runs(client)
    problems = [f"run {r.info.run_id} ({r.info.run_name}) is RUNNING" for r in runs if r.info.status == "RUNNING"]
    if not storage:
        return problems
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.trials:
            if trial.state == TrialState.WAITING:
                continue
            where = f"study {study.study_name} trial #{trial.number}"
            if trial.state == TrialState.RUNNING:
                problems.append(f"{where} is RUNNING")
                continue
            mine = [r for r in runs if r.data.tags.get("study") == study.study_name
                    and r.data.tags.get("trial_number") == str(trial.number)]
            if len(mine) != 1:
                problems.append(f"{where} ({trial.state.name}) has {len(mine)} runs")
                continue
            run = mine[0]
            if trial.user_attrs.get("mlflow_run_id", run.info.run_id) != run.info.run_id:
                problems.append(f"{where} names run {trial.user_attrs['mlflow_run_id']}, tagged run is {run.info.run_id}")
            status = run.info.status
            if status not in AGREE[trial.state]:
                problems.append(f"{where} is {trial.state.name} but its run {run.info.run_id} is {status}")
            elif trial.state == TrialState.FAIL and status == "KILLED" and run.data.tags.get("error") not in INTERRUPTED:
                problems.append(f"{where} is FAIL but its run is KILLED without an interruption tag")
    return problems


def check_registry() -> list[str]:
    """Twin versions of one run; `@champion` not on the best version."""
    client = connect(reap=False)
    problems = []
    for model in client.search_registered_models():
        found = model_versions(client, model.name)
        seen: dict[str, str] = {}
        for version in found:
            if version.run_id in seen:
                problems.append(f"{model.name}: v{seen[version.run_id]} and v{version.version} are one run "
                                f"{version.run_id}")
            seen.setdefault(version.run_id, str(version.version))
        if not found:
            continue
        champion = (model.aliases or {}).get(CHAMPION)
        metric = next((v.tags.get("metric") for v in found if v.tags.get("metric")), "image_auroc")
        best = best_version(client, model.name, protocol_for_metric(metric))
        if champion is None:
            problems.append(f"{model.name}: {len(found)} versions but no @{CHAMPION}")
        elif best is not None and str(champion) != str(best.version):
            problems.append(f"{model.name}: @{CHAMPION} is v{champion}, the best version is v{best.version}")
    return problems


def _store_objects(client, storage: str | None) -> Iterator[tuple[str, str]]:
    """(what, its full text) for every object the stores hold: runs (params, tags, dataset inputs, artifact
    URI), experiments, logged models, registered models and versions, Optuna studies and trials."""
    for experiment in client.search_experiments():
        yield f"experiment {experiment.name}", repr(experiment)
        for model in client.search_logged_models([experiment.experiment_id]):
            yield f"logged model {model.model_id}", repr(model)
    for run in _all_runs(client):
        yield f"run {run.info.run_id}", repr(run)
    for model in client.search_registered_models():
        yield f"registered model {model.name}", repr(model)
        for version in model_versions(client, model.name):
            yield f"{model.name} v{version.version}", repr(version)
    for summary in optuna.get_all_study_summaries(storage) if storage else ():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        yield f"study {study.study_name}", repr(study.user_attrs)
        for trial in study.trials:
            yield f"study {study.study_name} trial #{trial.number}", repr(trial)


def _table_texts(database: Path) -> Iterator[tuple[str, str]]:
    """(table, text) for every text or blob value of every table of the sqlite file `database` (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in connection.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, (str, bytes)):
                        yield table, value if isinstance(value, str) else value.decode("utf-8", "replace")


def check_secrets(secrets: Iterable[str], folders: Iterable[Path] = (), storage: str | None = None,
                  databases: Iterable[Path] = ()) -> list[str]:
    """Any secret in an object of the stores (`_store_objects`: MLflow through its API, Optuna `storage`), in any
    table of the sqlite files `databases`, or in a file under `folders` (artifact stores, logs)."""
    client = connect(reap=False)
    secrets = [s for s in secrets if s]
    problems = [f"{what} holds a secret" for what, text in _store_objects(client, storage)
                if any(s in text for s in secrets)]
    for database in databases:
        leaked = sorted({table for table, text in _table_texts(Path(database)) if any(s in text for s in secrets)})
        problems += [f"table {table} of {Path(database).name} holds a secret" for table in leaked]
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and path.suffix != ".db":
                data = path.read_bytes()
                if any(s.encode() in data for s in secrets):
                    problems.append(f"file {path} holds a secret")
    return problems


def check_all(storage: str | None, secrets: Iterable[str] = (), folders: Iterable[Path] = (),
              databases: Iterable[Path] = ()) -> list[str]:
    return check_runs_and_trials(storage) + check_registry() + check_secrets(secrets, folders, storage, databases)


__all__ = ["check_runs_and_trials", "check_registry", "check_secrets", "check_all"]
