"""The tracking store: which one (`tracking_uri`), the one way to a client (`connect`), experiments, and faults of
the store as one line (`store_guard`).

Local store by default (`sqlite:///mlruns/mlflow.db`, artifacts under `mlruns/artifacts`);
`MLFLOW_TRACKING_URI` (or `tracking.uri`) points it at a tracking server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fastflow.runtime.faults import StoreError, describe, guard, store_error
from fastflow.runtime.redact import redact
from fastflow.runtime.sqlite_store import open_sqlite
from fastflow.tracking.owners import close_dead_runs

LOCAL_STORE = Path("mlruns")
STORE = "MLflow tracking store"  # how errors name it (faults.py)
SCHEMA_TABLE = "experiments"  # a table every MLflow store has: a database without it is not one
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def tracking_uri(configured: str = "", create: bool = True) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the local sqlite store `mlruns/mlflow.db` (created unless
    `create` is False: commands that only read or register raise FileNotFoundError rather than start an empty one)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = LOCAL_STORE.resolve() / "mlflow.db"
    if not create and not store.is_file():
        raise FileNotFoundError(f"no MLflow store here: {store} does not exist; run this from the project folder "
                                "(where `fastflow train`/`make sweep` ran) or set MLFLOW_TRACKING_URI")
    LOCAL_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{store}"


def connect(configured: str = "", create: bool = False, reap: bool = True) -> MlflowClient:
    """The one way to a client: resolve the URI (`tracking_uri`), make it MLflow's current one (fluent calls
    such as `mlflow.register_model` use it), then create the client on it. Never `MlflowClient()` first:
    without a URI set it opens a stray ./mlflow.db. `reap`: first close the runs of this host's dead processes
    (owners.close_dead_runs); checks of the stores pass False, to see them as they are."""
    uri = tracking_uri(configured, create)
    open_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if reap:
        close_dead_runs(client)
    return client


_REACHED: set[str] = set()


def open_store(uri: str) -> None:
    """First contact with the store at `uri` (once per process): a tracking server must answer
    (`check_reachable`); a sqlite store is checked before use and created once among racing processes
    (`sqlite_store.open_sqlite`): a damaged, empty or foreign file is one `StoreError` line, left as it is."""
    if uri in _REACHED:
        return
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
        return
    open_sqlite(uri, STORE, SCHEMA_TABLE, lambda: MlflowClient(uri).search_experiments(max_results=1))
    _REACHED.add(uri)


def check_reachable(uri: str, seconds: float = 10.0) -> None:
    """First contact with a tracking server (once per process): one `StoreError` line within seconds when it does
    not answer, instead of minutes of MLflow's retries. Later outages are retried by MLflow (a 60 s restart of the
    server loses nothing)."""
    if not uri.startswith(("http://", "https://")) or uri in _REACHED:
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=seconds)
    except requests.RequestException as error:
        raise (store_error(error, {STORE: uri})
               or StoreError(f"{STORE} {redact(uri)}: {redact(describe(error))}")) from None
    _REACHED.add(uri)


def quoted(value: str) -> str:
    """`value` as a string literal of an MLflow filter (single quotes, or double when it holds a single quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quotes; MLflow search filters cannot express it")


def ensure_experiment(name: str, uri: str) -> str:
    """Create (once) or fetch the experiment; tags it so MLflow 3's UI opens on the runs table. Closes the runs of
    this host's dead processes first (every command that writes runs passes here)."""
    open_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    close_dead_runs(client)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):  # next to the database file (the URI's query, e.g. a password, left out)
            location = (Path(uri.removeprefix("sqlite:///").split("?")[0]).parent / "artifacts").resolve().as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


def store_guard(uri: str = ""):
    """Faults of the tracking store at `uri` (default: the current one) inside become one `StoreError` line."""
    return guard({STORE: uri or mlflow.get_tracking_uri()})


def server_url() -> str:
    """The tracking server's web address (no credentials) when runs go to one, else ""."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return ""
    scheme, rest = uri.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}" + (f"/{path}".rstrip("/") if path else "")


def experiment_url(experiment: str, port: int) -> str:
    """Direct link to the runs table in MLflow 3's machine-learning layout (it otherwise opens the GenAI one)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
