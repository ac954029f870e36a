"""MLflow model registry: register a trial's model as `fastflow-<category>` and move `champion` only on improvement.

Safe to run again and from several machines at once, using only the registry's own state:
- a run is registered at most once: a promoter registers only when the run has no version, then re-reads;
  when racing promoters both registered the run, every one of them keeps the run's lowest version and the
  higher twin is deleted (by its creator, or by the next promotion if its creator was killed). That
  duplicate is the only version ever deleted; it points at the same logged model as its twin.
- `@champion` is the best version by the protocol's `ranking_key` (objective, then its tie-breaks; then the
  lower version) among versions >= the registered model's `champion_floor` tag (set by `--force`). Each
  promoter sets the alias from a fresh read and re-reads until alias and best agree, so the last writer
  always wrote the best of everything registered before it: racing promoters converge on the right champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fastflow.engine.protocol import Protocol, RANKED_METRICS, protocol_for_metric, ranking_key
from fastflow.pages.model_card import registered_model_description, run_link, version_description
from fastflow.runtime.redact import redact
from fastflow.tracking.names import model_name
from fastflow.tracking.store import connect, ensure_experiment, quoted, tracking_uri

log = logging.getLogger(__name__)
CHAMPION = "champion"
FLOOR_TAG = "champion_floor"  # registered-model tag: versions below it no longer compete for @champion


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    value: float
    promoted: bool  # the champion alias now points at this version
    previous_champion: Optional[str]
    previous_value: Optional[float]
    champion: Optional[str] = None  # the version @champion points at after this promotion


def best_run(category: str, metric: str, experiment: str = "fastflow", study: str = ""):
    """The finished run with a logged model and the highest `best/<metric>` for the category (or study)."""
    client = connect()
    experiment_id = ensure_experiment(experiment, tracking_uri())
    query = f"tags.category = {quoted(category)} and attributes.status = 'FINISHED'"
    if study:
        query += f" and tags.study = {quoted(study)}"
    runs = client.search_runs([experiment_id], filter_string=query, order_by=[f"metrics.`best/{metric}` DESC"],
                              max_results=50)
    runs = [r for r in runs if "model_uri" in r.data.tags and f"best/{metric}" in r.data.metrics]
    if not runs:
        raise LookupError(f"no finished run with a logged model and metric best/{metric} for category '{category}'"
                          f"{f' in study {study}' if study else ''} (experiment '{experiment}'); run a sweep or train first")
    return runs[0]


def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model `name`."""
    return list(client.search_model_versions(f"name = {quoted(name)}"))


def _version_for_run(client: MlflowClient, name: str, run_id: str) -> Optional[ModelVersion]:
    """The run's version: its lowest, when racing promoters registered it twice."""
    mine = [v for v in model_versions(client, name) if v.run_id == run_id]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def version_tags(run, metric: str) -> dict[str, str]:
    """Tags of a new version: only what `@champion` is ranked by, read without opening the run (the objective it was
    registered for and both protocols' ranking metrics). The rest (run, study, data, protocol, threshold and its
    source, intervals) is in the version's description and on its run."""
    metrics = run.data.metrics
    return {"metric": metric, **{f"best/{k}": f"{metrics[f'best/{k}']:.6f}" for k in RANKED_METRICS
                                 if f"best/{k}" in metrics}}


def _delete_twin(client: MlflowClient, name: str, version: ModelVersion, keep: ModelVersion) -> None:
    if version.aliases:
        log.warning("%s v%s duplicates v%s but holds aliases %s; kept", name, version.version, keep.version,
                    version.aliases)
        return
    try:
        client.delete_model_version(name, version.version)
        log.info("%s: deleted v%s, a second registration of run %s (v%s kept)", name, version.version,
                 version.run_id, keep.version)
    except MlflowException:  # another promoter deleted it first
        pass


def register_once(client: MlflowClient, name: str, run, metric: str) -> ModelVersion:
    """The run's one version of `name`: the existing one, or a new registration (its twin from a racing
    promoter resolved to the lower version)."""
    existing = _version_for_run(client, name, run.info.run_id)
    if existing is not None:
        return existing
    created = mlflow.register_model(run.data.tags["model_uri"], name, tags=version_tags(run, metric))
    kept = _version_for_run(client, name, run.info.run_id) or created
    if str(kept.version) != str(created.version):
        _delete_twin(client, name, created, kept)
    return kept


def remove_twins(client: MlflowClient, name: str) -> None:
    """Delete second registrations left by a promoter killed between registering and resolving its twin."""
    by_run: dict[str, list[ModelVersion]] = {}
    for version in model_versions(client, name):
        by_run.setdefault(version.run_id, []).append(version)
    for versions in by_run.values():
        keep, *twins = sorted(versions, key=lambda v: int(v.version))
        for twin in twins:
            _delete_twin(client, name, twin, keep)


def _rank(version: ModelVersion, protocol: Protocol) -> tuple[float, ...]:
    metrics = {}
    for key, value in version.tags.items():
        try:
            metrics[key] = float(value)
        except ValueError:
            continue
    return ranking_key(metrics, protocol, prefix="best/") + (-int(version.version),)  # ties: the earlier version


def best_version(client: MlflowClient, name: str, protocol: Protocol) -> Optional[ModelVersion]:
    """The version `@champion` should point at: the best by `protocol` among versions >= the floor tag."""
    floor = int(client.get_registered_model(name).tags.get(FLOOR_TAG, "0") or 0)
    candidates = [v for v in model_versions(client, name) if int(v.version) >= floor]
    return max(candidates, key=lambda v: _rank(v, protocol)) if candidates else None


def _champion(client: MlflowClient, name: str) -> Optional[ModelVersion]:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def settle_champion(client: MlflowClient, name: str, protocol: Protocol, attempts: int = 10) -> Optional[ModelVersion]:
    """Point `@champion` at `best_version`, re-reading after each write until both agree (racing promoters)."""
    best = None
    for _ in range(attempts):
        best = best_version(client, name, protocol)
        current = _champion(client, name)
        if best is None or (current is not None and str(current.version) == str(best.version)):
            return best
        client.set_registered_model_alias(name, CHAMPION, best.version)
    return best


def promote(category: str, metric: str = "image_auroc", experiment: str = "fastflow", study: str = "",
            force: bool = False, run_id: str = "") -> Promotion:
    """Register the best run's model (once) and move `champion` to it if it beats the current champion.

    `force`: versions registered before this one stop competing (the `champion_floor` tag), so it becomes
    champion unless a later version beats it."""
    client = connect()
    ensure_experiment(experiment, tracking_uri())
    run = client.get_run(run_id) if run_id else best_run(category, metric, experiment, study)
    value = run.data.metrics[f"best/{metric}"]
    name = model_name(category)
    protocol = protocol_for_metric(metric)  # the objective, then the same protocol's tie-breaking metrics
    version = register_once(client, name, run, metric)
    remove_twins(client, name)
    _describe(client, name, version.version, run, metric)  # idempotent: the same text for the same run
    previous = _champion(client, name)
    previous_value = float(previous.tags[f"best/{metric}"]) if previous and f"best/{metric}" in previous.tags else None
    if force:
        client.set_registered_model_tag(name, FLOOR_TAG, version.version)
    champion = settle_champion(client, name, protocol)
    is_champion = champion is not None and str(champion.version) == str(version.version)
    return Promotion(name, version.version, run.info.run_id, value, is_champion,
                     previous.version if previous else None, previous_value,
                     str(champion.version) if champion is not None else None)


def _describe(client: MlflowClient, name: str, version: str, run, metric: str) -> None:
    """Descriptions on the registered model and on the new version (see model_card.py)."""
    client.update_registered_model(name, description=registered_model_description(run.data.tags.get("category", "")))
    client.update_model_version(name, version, description=version_description(
        run.info.run_name or run.info.run_id, run.data.tags, run.data.metrics, metric,
        run_link(run.info.experiment_id, run.info.run_id)))


# ---------------------------------------------------------------- the run behind a `models:/` URI (predict, export)


def registered_model_names() -> list[str]:
    return sorted(model.name for model in connect().search_registered_models())


def registered_version(uri: str) -> ModelVersion:
    """The version a `models:/<name>@<alias>`, `models:/<name>/<version>` or `models:/<name>/latest` URI names;
    an unknown model, alias or version is a ValueError naming what exists."""
    client = connect()
    spec = uri.removeprefix("models:/").strip("/")
    name, alias, version = spec, None, None
    if "@" in spec:
        name, alias = spec.split("@", 1)
    elif "/" in spec:
        name, version = spec.split("/", 1)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"unknown registered model '{name}' ({uri}); registered models: "
                         f"{', '.join(registered_model_names()) or 'none'} "
                         f"(tracking store {redact(mlflow.get_tracking_uri())})") from None
    if alias is not None:
        if alias not in (model.aliases or {}):
            raise ValueError(f"model '{name}' has no alias '{alias}'; aliases: "
                             f"{', '.join(sorted(model.aliases or {})) or 'none'}")
        return client.get_model_version_by_alias(name, alias)
    versions = {str(v.version): v for v in model_versions(client, name)}
    if version in (None, "latest") and versions:
        return versions[max(versions, key=int)]
    if version not in versions:
        raise ValueError(f"model '{name}' has no version {version}; versions: {', '.join(sorted(versions, key=int))}")
    return versions[version]


def model_run_id(model: str) -> str:
    """The run behind `models:/...`, `runs:/<run id>/...` or a run id: only the registry's and the tracking
    store's records are read, nothing of the logged model."""
    if model.startswith("models:/"):
        return registered_version(model).run_id
    run_id = model.removeprefix("runs:/").split("/")[0]
    try:
        connect().get_run(run_id)
    except MlflowException:
        raise ValueError(f"no run {run_id} in the tracking store {redact(mlflow.get_tracking_uri())}") from None
    return run_id


