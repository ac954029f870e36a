"""Consistency checks of the stores after any command (used by the fault-injection test and `make chaos`).

Through the public MLflow and Optuna APIs only; each check returns the violations it found as lines.
- no Optuna trial and no MLflow run is RUNNING;
- every started trial (not WAITING) has exactly one run, and their states agree: COMPLETE-FINISHED,
  PRUNED-KILLED, FAIL-FAILED (or KILLED with an interruption tag: the trial was stopped by a signal);
- no registered model has two versions from one run;
- `@champion` is the best version by `registry.best_version` (protocol ranking, tie: earlier version);
- no secret appears in any param, tag, artifact or log file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import optuna
from optuna.trial import TrialState

from .protocol import protocol_for_metric
from .registry import CHAMPION, best_version, model_versions
from .tracking import connect

AGREE = {TrialState.COMPLETE: {"FINISHED"}, TrialState.PRUNED: {"KILLED"}, TrialState.FAIL: {"FAILED", "KILLED"}}
INTERRUPTED = ("interrupted", "terminated (SIGTERM)")


def _all_runs(client) -> list:
    runs = []
    for experiment in client.search_experiments():
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


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


def check_secrets(secrets: Iterable[str], folders: Iterable[Path] = ()) -> list[str]:
    """Any secret in a run's params or tags, a model version's tags, or a file under `folders`
    (artifact stores, logs)."""
    client = connect(reap=False)
    secrets = [s for s in secrets if s]
    problems = []
    for run in _all_runs(client):
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            for key, value in values.items():
                if any(s in value for s in secrets):
                    problems.append(f"run {run.info.run_id} {kind} {key} holds a secret")
    for model in client.search_registered_models():
        for version in model_versions(client, model.name):
            if any(s in value for value in version.tags.values() for s in secrets):
                problems.append(f"{model.name} v{version.version} tags hold a secret")
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and path.suffix != ".db":
                data = path.read_bytes()
                if any(s.encode() in data for s in secrets):
                    problems.append(f"file {path} holds a secret")
    return problems


def check_all(storage: str | None, secrets: Iterable[str] = (), folders: Iterable[Path] = ()) -> list[str]:
    return check_runs_and_trials(storage) + check_registry() + check_secrets(secrets, folders)


__all__ = ["check_runs_and_trials", "check_registry", "check_secrets", "check_all"]
