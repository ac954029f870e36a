"""MLflow tracking: the only module besides registry.py that imports mlflow.

Local store by default (`sqlite:///mlruns/mlflow.db`, artifacts under `mlruns/artifacts`);
`MLFLOW_TRACKING_URI` (or `tracking.uri`) points it at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # its "View run at <uri>" lines carry credentials
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # no pickled model is ever loaded here
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar per download on stderr

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .config import RunConfig, dump_yaml  # noqa: E402
from .faults import StoreError, describe, fault_of, guard, store_error  # noqa: E402
from .owners import OWNER_TAG, close_dead_runs, owner_tags  # noqa: E402
from .protocol import resolve_selection  # noqa: E402
from .redact import redact  # noqa: E402
from .signals import Interrupted, received as received_signal  # noqa: E402
from .visualize import close_figure, curves_figure, labelled_heatmap_grid  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its tracebacks: faults are one line (faults.py)

LOCAL_STORE = Path("mlruns")
STORE = "MLflow tracking store"  # how errors name it (faults.py)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
HEATMAP_KEY = "heatmaps"  # image key: step k = epoch k, step 0 = the best epoch (the UI's slider opens on step 0)
BEST_HEATMAPS = "heatmaps/best_epoch.png"  # the best epoch's grid as a plain artifact
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # the best checkpoint: what predict/export/the pyfunc load, as data
TEST_SCORES = "test_scores.json"  # per-image test-set scores at the best epoch (test protocol data, for analysis)
TEST_PIXEL_COUNTS = "test_pixel_counts.npz"  # per-image pixel counts per map-value bin at the best epoch (metrics.pixel_counts)
MODEL_OUTPUTS = (("scores", np.float32, (-1,)), ("normalized_scores", np.float32, (-1,)),
                 ("is_anomalous", np.bool_, (-1,)), ("anomaly_maps", np.float32, (-1, -1, -1)))


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
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if reap:
        close_dead_runs(client)
    return client


_REACHED: set[str] = set()


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
    check_reachable(uri)
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


def _git(*args: str) -> str:
    """`git <args>` in the package's folder (its checkout); "" when that is not a git checkout."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("git %s: %s", " ".join(args), error)
        return ""
    if done.returncode:
        log.debug("git %s in %s: %s", " ".join(args), Path(__file__).parent, done.stderr.strip())
    return done.stdout.strip() if done.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def program() -> str:
    """What started this process: `fastflow sweep`, `pytest`, `chaos.py`, ... (spawned workers inherit argv)."""
    argv = sys.argv or [""]
    path = Path(argv[0])
    if path.name == "fastflow" and len(argv) > 1:
        return f"fastflow {argv[1]}"
    if path.name in ("", "-c"):
        return "python"
    return path.parent.name if path.name == "__main__.py" else path.name


@functools.lru_cache(maxsize=1)
def lineage_tags() -> dict[str, str]:
    """MLflow's source tags (the runs table's Source and Version columns, the run page's Source) and `git_commit`:
    the command and the commit that produced a run, marked when the checkout had uncommitted changes."""
    commit = git_commit()
    tags = {"git_commit": commit, "mlflow.source.type": "LOCAL", "mlflow.source.name": program()}
    if commit != "unknown":
        dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
        tags.update({"mlflow.source.git.commit": commit, "mlflow.source.name": f"{program()} @ {commit[:7]}{dirty}"})
    return tags


class MlflowTracker:
    """Implements train.Tracker for one MLflow run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self._grids: dict[int, bytes] = {}  # epoch -> PNG of its heatmap grid, for the best epoch at the end
        self._threshold_source = "stored threshold"  # the run's `threshold_source` tag, named on the heatmap grids

    def log_params(self, params: dict) -> None:
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict) -> None:
        self._threshold_source = str(tags.get("threshold_source", self._threshold_source))
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value))[:5000])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        skipped = set(metrics) - set(finite)
        if skipped:
            log.warning("not logging non-finite metrics %s at step %d", sorted(skipped), step)
        timestamp = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp, step) for k, v in finite.items()])

    def log_epoch_visuals(self, epoch: int, images, masks, maps, scores=None, labels=None, names=None,
                          threshold=None) -> None:
        """The labelled heatmap grid of `epoch` (with each row's decision at that epoch's stored `threshold`) as
        image key `heatmaps`, step `epoch`."""
        if maps is None or len(maps) == 0:
            return
        scores = maps.flatten(1).amax(1).numpy() if scores is None else scores
        labels = (masks.flatten(1).amax(1) > 0).numpy() if labels is None else labels
        title = f"test images, epoch {epoch}" + (f"; stored threshold {threshold:.4g} ({self._threshold_source})"
                                                  if threshold is not None else "")
        grid = labelled_heatmap_grid(images, masks, maps, scores, labels, title, names=names, threshold=threshold)
        self.client.log_image(self.run_id, grid, key=HEATMAP_KEY, step=epoch)
        buffer = io.BytesIO()
        PILImage.fromarray(grid).save(buffer, format="PNG")
        self._grids[epoch] = buffer.getvalue()

    def log_dataset(self, name: str, digest: str, source: str, split_sizes: dict[str, int]) -> None:
        """The run's data as an MLflow dataset input (the runs table's Dataset column, the Datasets page)."""
        profile = json.dumps({"num_images": sum(split_sizes.values()), **{f"{k}_images": v for k, v in split_sizes.items()}})
        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": redact(source)}),
                          schema=json.dumps({"layout": "MVTec AD folders: train/good, validation/good, test/<defect>, "
                                                       "ground_truth/<defect>"}), profile=profile)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])

    def _log_best_heatmaps(self, epoch: int) -> None:
        """The best epoch's grid again at step 0 (where the UI's step slider opens) and as a plain PNG artifact."""
        if epoch not in self._grids:
            return
        grid = np.asarray(PILImage.open(io.BytesIO(self._grids[epoch])).convert("RGB"))
        self.client.log_image(self.run_id, grid, key=HEATMAP_KEY, step=0)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(BEST_HEATMAPS).name
            path.write_bytes(self._grids[epoch])
            self.client.log_artifact(self.run_id, str(path), str(Path(BEST_HEATMAPS).parent))

    def log_final(self, result, cfg: RunConfig) -> None:
        """Config, curves, best checkpoint and a loadable pyfunc model; best-epoch summary metrics."""
        summary = {f"best/{k.split('/')[-1]}": v for k, v in result.best_metrics.items() if k.startswith("eval/")}
        summary.update({"best/epoch": result.best_epoch, "inference/images_per_s": result.inference_images_per_s,
                        **{f"system/peak_{k}_mb": v for k, v in result.peak_memory_mb.items()}})
        self.log_metrics(summary, step=result.best_epoch)
        if result.checkpoint:  # how the saved model decides, for the registry's version description
            kind = result.checkpoint["threshold_kind"]
            self.set_tags({"threshold_kind": kind, "threshold": f"{result.checkpoint['thresholds'][kind]:.6g}"})
        has_validation = any("eval/val_image_auroc" in row for row in result.history)
        protocol, ranking = resolve_selection(cfg.eval.selection_metric, has_validation)
        figure = curves_figure(result.history, result.best_epoch, protocol.name, f"eval/{ranking[0]}")
        try:
            self.client.log_figure(self.run_id, figure, "curves.png")
        finally:
            close_figure(figure)  # pyplot keeps every figure it made: one leaked per run in a long sweep
        if result.test_scores:  # per-image test scores at the best epoch: for analysis and the study's reliability
            self.client.log_dict(self.run_id, result.test_scores, TEST_SCORES)
        if result.pixel_counts is not None:  # the test maps, binned per image: pixel AUROC intervals over seeds
            log_pixel_counts(self.client, self.run_id, result.pixel_counts)
        self._log_best_heatmaps(result.best_epoch)
        with tempfile.TemporaryDirectory() as folder:
            config_path = Path(folder) / "config.yaml"
            dump_yaml(cfg, config_path)
            self.client.log_artifact(self.run_id, str(config_path))
            history_path = Path(folder) / "history.json"
            history_path.write_text(json.dumps(result.history, indent=1))
            self.client.log_artifact(self.run_id, str(history_path))
            if result.checkpoint:
                checkpoint_path = Path(folder) / Path(CHECKPOINT_ARTIFACT).name
                torch.save(result.checkpoint, checkpoint_path)
                self.client.log_artifact(self.run_id, str(checkpoint_path), str(Path(CHECKPOINT_ARTIFACT).parent))
                if cfg.tracking.log_model:
                    log_pyfunc_model(self.run_id, checkpoint_path, cfg.data.category)


def model_signature() -> ModelSignature:
    """uint8 RGB images `(N,H,W,3)` in; the four arrays `FastFlowPyfunc.predict` returns out."""
    outputs = Schema([TensorSpec(np.dtype(dtype), shape, name) for name, dtype, shape in MODEL_OUTPUTS])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]), outputs=outputs)


def logged_model_name(category: str, run_name: str) -> str:
    """`<category>-<run name>` (e.g. `synthetic-trial-003`), in the characters MLflow allows in a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{category}-{run_name}").strip("-") or "model"


PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc model, logged as code (never a pickle)


def pip_requirements() -> list[str]:
    """Pinned to the versions this model was trained with (skips MLflow's slow inference)."""
    names = ["torch", "torchvision", "timm", "FrEIA", "numpy", "pillow", "pyyaml", "scikit-learn", "mlflow"]
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def log_pyfunc_model(run_id: str, checkpoint_path: Path, category: str) -> None:
    """Log the checkpoint as an MLflow pyfunc *model from code* (`fastflow/mlflow_model.py`, not a pickle) named
    after the run, with the `fastflow` package's code (`code_paths`), so it loads where the project is not
    installed; its URI goes into the tag `model_uri`."""
    client = MlflowClient()
    name = logged_model_name(category, client.get_run(run_id).info.run_name or run_id)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # its environment notices on every trial
    with warnings.catch_warnings(), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        warnings.simplefilter("ignore", UserWarning)  # type-hint and input-example notices; the signature is set
        info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_CODE),
                                       artifacts={"checkpoint": str(checkpoint_path)},
                                       code_paths=[str(PYFUNC_CODE.parent)],
                                       signature=model_signature(), pip_requirements=pip_requirements())
    client.set_tag(run_id, "model_uri", info.model_uri)
    client.set_tag(run_id, "model_name", name)


@contextlib.contextmanager
def start_run(cfg: RunConfig, run_name: str = "", parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> Iterator[MlflowTracker]:
    """An MLflow run that always ends: FINISHED, FAILED (error tagged) or KILLED (Ctrl-C). A fault of the store
    (disk full, read-only, server unreachable) is one `StoreError` line naming it; a run the fault leaves RUNNING
    is closed by the next command on this host (owners)."""
    uri = tracking_uri(cfg.tracking.uri)
    with store_guard(uri):
        experiment_id = ensure_experiment(cfg.tracking.experiment, uri)
        # tag values must be strings: the REST store (mlflow server) rejects ints/floats that sqlite stores accept
        all_tags = {**lineage_tags(), **owner_tags(),
                    **{key: redact(str(value)) for key, value in (tags or {}).items()}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = MlflowClient().create_run(experiment_id, run_name=run_name or cfg.tracking.run_name or None,
                                           tags=all_tags).info.run_id
    try:
        yield MlflowTracker(run_id)
    except KeyboardInterrupt as error:
        _close(run_id, "KILLED", interruption_note(error))
        raise
    except BaseException as error:
        signum = received_signal()
        if signum is not None:  # cleanup replaced the signal's exception with its own error
            interrupted = Interrupted(signum)
            _close(run_id, "KILLED", interruption_note(interrupted))
            raise interrupted from error
        fault = store_error(error, {STORE: uri})
        if fault is not None:
            closed = _close(run_id, "FAILED", str(fault))
            raise StoreError(f"{fault}" + ("" if closed else f"; run {run_id} stays RUNNING until the next command "
                                                             "on this host closes it")) from None
        _close(run_id, getattr(error, "mlflow_status", "FAILED"), f"{type(error).__name__}: {error}")
        raise
    else:
        with store_guard(uri):
            end_run(run_id, "FINISHED")


def store_guard(uri: str = ""):
    """Faults of the tracking store at `uri` (default: the current one) inside become one `StoreError` line."""
    return guard({STORE: uri or mlflow.get_tracking_uri()})


def _close(run_id: str, status: str, note: str) -> bool:
    """`end_run`, unless the store fails too (a full disk, the server gone): then False, and the next command on
    this host closes the run (its owner is gone by then)."""
    try:
        end_run(run_id, status, note)
        return True
    except Exception as error:
        if not fault_of(error):
            raise
        log.debug("could not end run %s: %s", run_id, describe(error))
        return False


def interruption_note(error: KeyboardInterrupt) -> str:
    """The `error` tag of a run stopped by a signal: "interrupted" (Ctrl-C) or "terminated (SIGTERM)"."""
    return "terminated (SIGTERM)" if isinstance(error, Interrupted) and error.signum == signal.SIGTERM else "interrupted"


def end_run(run_id: str, status: str, error: str = "") -> None:
    client = MlflowClient()
    if error:
        client.set_tag(run_id, "error", redact(error)[:5000])
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def set_owner(run_id: str, owner: str) -> None:
    """Hand a run to another process (`host:pid:start`): a study's parent run left RUNNING for a running trial."""
    MlflowClient().set_tag(run_id, OWNER_TAG, owner)


def run_status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def find_parent_run(experiment: str, study_name: str) -> Optional[str]:
    """The parent run of a study by its tags (studies whose run id is not stored on the study)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    runs = MlflowClient().search_runs([experiment_id], max_results=1,
                                     filter_string=f"tags.study = {quoted(study_name)} and tags.role = 'study'")
    return runs[0].info.run_id if runs else None


def start_parent_run(experiment: str, study_name: str, tags: dict, run_id: Optional[str] = None) -> str:
    """Reopen the study's parent run `run_id` (status RUNNING), or create it; then (re)set its tags."""
    client = MlflowClient()
    experiment_id = ensure_experiment(experiment, tracking_uri())
    if run_id:
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=study_name,
                                   tags={"role": "study", "study": study_name, **lineage_tags()}).info.run_id
    for key, value in {**tags, **owner_tags()}.items():  # reopened: this process owns it now
        client.set_tag(run_id, key, redact(str(value)))
    return run_id


STUDY_PAGE = "study.html"


def finish_parent_run(run_id: str, figures: dict, metrics: dict[str, float], status: str, page: str = "") -> None:
    """Attach the study's figures, its HTML page (`study.html`) and best metrics, then end the parent run."""
    client = MlflowClient()
    for name, figure in figures.items():
        try:
            client.log_figure(run_id, figure, f"study/{name}")
        finally:
            close_figure(figure)
    if page:
        client.log_text(run_id, page, STUDY_PAGE)
    if metrics:
        MlflowTracker(run_id).log_metrics(metrics, step=0)
    end_run(run_id, status)


NOTE_TAG = "mlflow.note.content"  # a run's description: markdown at the top of its Overview


def set_descriptions(notes: dict[str, str]) -> None:
    """Set the description of each run id in `notes` (markdown; MLflow keeps 8000 characters)."""
    client = MlflowClient()
    for run_id, text in notes.items():
        client.set_tag(run_id, NOTE_TAG, redact(text))


def log_new_params(run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet (params never change: a resumed study whose settings differ keeps
    the first values and says so in the log)."""
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    for key, value in params.items():
        if key in logged and logged[key] != redact(str(value))[:6000]:
            log.warning("param %s stays %r on run %s (this invocation: %r)", key, logged[key], run_id, value)
    MlflowTracker(run_id).log_params({k: v for k, v in params.items() if k not in logged})


def server_url() -> str:
    """The tracking server's web address (no credentials) when runs go to one, else ""."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return ""
    scheme, rest = uri.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}" + (f"/{path}".rstrip("/") if path else "")


def child_run_summaries(parent_run_id: str) -> dict[str, dict]:
    """run id -> {name, status, experiment_id, metrics (latest values), tags} of the parent's nested runs."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = {quoted(parent_run_id)}",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return {run.info.run_id: {"name": run.info.run_name, "status": run.info.status,
                              "experiment_id": run.info.experiment_id, "metrics": dict(run.data.metrics),
                              "tags": dict(run.data.tags)} for run in runs}


def read_test_scores(run_id: str) -> Optional[dict]:
    """A run's per-image test scores at its best epoch (`TEST_SCORES`), or None when it has none."""
    data = read_artifact(run_id, TEST_SCORES)
    return json.loads(data) if data is not None else None


def log_pixel_counts(client: MlflowClient, run_id: str, counts: tuple[np.ndarray, np.ndarray]) -> None:
    """`metrics.pixel_counts` (normal, defect) as the compressed array file `TEST_PIXEL_COUNTS`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / TEST_PIXEL_COUNTS
        np.savez_compressed(path, normal=counts[0], defect=counts[1])
        client.log_artifact(run_id, str(path))


def log_peer_run(experiment: str, name: str, tags: dict, params: dict, metrics: dict[str, float],
                 history: dict[int, dict[str, float]], test_scores: dict, pixel_counts: tuple) -> str:
    """A FINISHED run for a result measured here with another implementation (benchmarks/side_by_side.py): its
    tags (`implementation`, protocol), params, best-epoch metrics, per-epoch `eval/*` history, per-image test scores
    and binned test pixels, as this project's runs log them, so `fastflow report` can place it beside them."""
    client = connect()
    run = client.create_run(ensure_experiment(experiment, tracking_uri()), run_name=name,
                            tags={k: redact(str(v)) for k, v in tags.items()})
    tracker = MlflowTracker(run.info.run_id)
    tracker.log_params(params)
    for epoch, values in sorted(history.items()):
        tracker.log_metrics({f"eval/{k}": v for k, v in values.items()}, step=epoch)
    tracker.log_metrics(metrics, step=int(metrics.get("best/epoch", 0)))
    client.log_dict(run.info.run_id, test_scores, TEST_SCORES)
    log_pixel_counts(client, run.info.run_id, pixel_counts)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def read_pixel_counts(run_id: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A run's binned test pixels at its best epoch (`TEST_PIXEL_COUNTS`: normal, defect), or None. Read as plain
    arrays (no pickles)."""
    data = read_artifact(run_id, TEST_PIXEL_COUNTS)
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return arrays["normal"], arrays["defect"]


def download_checkpoint(run_id: str, folder: Path) -> Path:
    """The run's `CHECKPOINT_ARTIFACT` downloaded into `folder`; ValueError naming the run when it has none."""
    try:
        return Path(MlflowClient().download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(folder)))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise ValueError(f"run {run_id} has no readable {CHECKPOINT_ARTIFACT} artifact ({redact(describe(error))}); "
                         "only runs of `fastflow train`/`sweep` carry one") from None


def read_artifact(run_id: str, path: str) -> Optional[bytes]:
    """The bytes of a run's artifact, or None when it does not exist."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            return Path(MlflowClient().download_artifacts(run_id, path, folder)).read_bytes()
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def experiment_url(experiment: str, port: int) -> str:
    """Direct link to the runs table in MLflow 3's machine-learning layout (it otherwise opens the GenAI one)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# ---------------------------------------------------------------- reading runs back (report, paper)


def finished_runs(experiment: str, filter_string: str = "", uri: str = "") -> list:
    """Every FINISHED run of `experiment` matching `filter_string` (MLflow search syntax), newest first.

    An unknown experiment raises ValueError naming the experiments that exist.
    """
    client = connect(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"unknown experiment '{experiment}'; experiments: {', '.join(names) or 'none'} "
                         f"(tracking store {redact(mlflow.get_tracking_uri())})")
    query = " and ".join(q for q in ("attributes.status = 'FINISHED'", filter_string) if q)
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def log_report_run(experiment: str, files: list[Path], metrics: dict[str, float], uri: str = "") -> str:
    """A FINISHED run named `report` (tag role=report) holding `files` under the artifact folder `report/`."""
    experiment_id = ensure_experiment(experiment, tracking_uri(uri))
    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name="report",
                               tags={"role": "report", **lineage_tags(), **owner_tags()}).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), "report")
    MlflowTracker(run_id).log_metrics(metrics, step=0)
    end_run(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------- runs of trials whose worker died (sweep)


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def trial_runs(experiment: str, study_name: str, trial_number: int) -> list:
    """The runs tagged with this study's trial number (a worker may die before the trial knows its run id)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    query = f"tags.study = {quoted(study_name)} and tags.trial_number = '{trial_number}'"
    return list(MlflowClient().search_runs([experiment_id], filter_string=query, max_results=10))


def record_lost_run(experiment: str, run_name: str, parent_run_id: str, tags: dict, error: str) -> str:
    """A FAILED run standing for a trial whose worker died before creating its own run (one run per trial)."""
    experiment_id = ensure_experiment(experiment, tracking_uri())
    all_tags = {**lineage_tags(), "mlflow.parentRunId": parent_run_id,
                **{key: redact(str(value)) for key, value in tags.items()}}
    run_id = MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    end_run(run_id, "FAILED", error)
    return run_id
