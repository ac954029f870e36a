"""MLflow model registry: register a trial's model as `fastflow-<category>` and move `champion` only on improvement.

Versions are never deleted; a run already registered is not registered twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .tracking import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)
CHAMPION = "champion"


def model_name(category: str) -> str:
    return f"fastflow-{category}"


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    value: float
    promoted: bool  # the champion alias now points at this version
    previous_champion: Optional[str]
    previous_value: Optional[float]


def best_run(category: str, metric: str, experiment: str = "fastflow", study: str = ""):
    """The finished run with a logged model and the highest `best/<metric>` for the category (or study)."""
    client = MlflowClient()
    experiment_id = ensure_experiment(experiment, tracking_uri())
    query = f"tags.category = '{category}' and attributes.status = 'FINISHED'"
    if study:
        query += f" and tags.study = '{study}'"
    runs = client.search_runs([experiment_id], filter_string=query, order_by=[f"metrics.`best/{metric}` DESC"],
                              max_results=50)
    runs = [r for r in runs if "model_uri" in r.data.tags and f"best/{metric}" in r.data.metrics]
    if not runs:
        raise LookupError(f"no finished run with a logged model and metric best/{metric} for category '{category}'"
                          f"{f' in study {study}' if study else ''} (experiment '{experiment}'); run a sweep or train first")
    return runs[0]


def _version_for_run(client: MlflowClient, name: str, run_id: str):
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            return version
    return None


PROVENANCE_TAGS = ("selection_protocol", "threshold_source", "validation_source")


def tag_version_provenance(client: MlflowClient, name: str, version: str, run) -> None:
    """Copy how the run chose its epoch and stored threshold onto the registered version (idempotent)."""
    for key in PROVENANCE_TAGS:
        if key in run.data.tags:
            client.set_model_version_tag(name, version, key, run.data.tags[key])


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(category: str, metric: str = "image_auroc", experiment: str = "fastflow", study: str = "",
            force: bool = False, run_id: str = "") -> Promotion:
    """Register the best run's model and move `champion` to it if it beats the current champion (or `force`)."""
    client = MlflowClient()
    ensure_experiment(experiment, tracking_uri())
    run = client.get_run(run_id) if run_id else best_run(category, metric, experiment, study)
    value = run.data.metrics[f"best/{metric}"]
    name = model_name(category)
    version = _version_for_run(client, name, run.info.run_id)
    if version is None:
        tags = {"run_id": run.info.run_id, "metric": metric, "study": run.data.tags.get("study", ""),
                **{k: f"{v:.6f}" for k, v in run.data.metrics.items() if k.startswith("best/")}}
        version = mlflow.register_model(run.data.tags["model_uri"], name, tags=tags)
    tag_version_provenance(client, name, version.version, run)
    champion = _champion(client, name)
    previous_value = float(champion.tags[f"best/{metric}"]) if champion and f"best/{metric}" in champion.tags else None
    better = champion is None or previous_value is None or value > previous_value
    promoted = (force or better) and (champion is None or champion.version != version.version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    is_champion = promoted or (champion is not None and champion.version == version.version)
    return Promotion(name, version.version, run.info.run_id, value, is_champion,
                     champion.version if champion else None, previous_value)


# ---------------------------------------------------------------- loading logged models (predict, export)


def registered_model_names() -> list[str]:
    return sorted(model.name for model in MlflowClient().search_registered_models())


def _check_model_uri(uri: str) -> None:
    """Fail early, naming what exists, when a `models:/` URI names an unknown model, alias or version."""
    client = MlflowClient()
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
                         f"(tracking store {mlflow.get_tracking_uri()})") from None
    if alias is not None and alias not in (model.aliases or {}):
        raise ValueError(f"model '{name}' has no alias '{alias}'; aliases: "
                         f"{', '.join(sorted(model.aliases or {})) or 'none'}")
    if version is not None and version.isdigit():
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        if int(version) not in versions:
            raise ValueError(f"model '{name}' has no version {version}; versions: {', '.join(map(str, versions))}")


def load_logged_predictor(uri: str):
    """`models:/<name>@<alias>`, `models:/<name>/<version>` or `runs:/<run id>/model` -> its `inference.Predictor`."""
    mlflow.set_tracking_uri(tracking_uri())
    if uri.startswith("models:/"):
        _check_model_uri(uri)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # pip-version notices on every load
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as error:
        raise ValueError(f"cannot load model {uri}: {error.message}") from None
    return model.unwrap_python_model().predictor
