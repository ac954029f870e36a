"""The run logger: `MlflowTracker` (train.Tracker for one MLflow run) and what it logs at the end of a run, the
best checkpoint as data and as a pyfunc *model from code*; the artifact names it writes."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image as PILImage
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.tracking import MlflowClient

from fastflow.engine.protocol import resolve_selection
from fastflow.pages.visualize import close_figure, curves_figure, labelled_heatmap_grid
from fastflow.runtime.config import RunConfig, dump_yaml
from fastflow.runtime.redact import redact
from fastflow.tracking.names import logged_model_name

log = logging.getLogger(__name__)
HEATMAP_KEY = "heatmaps"  # image key: step k = epoch k, step 0 = the best epoch (the UI's slider opens on step 0)
BEST_HEATMAPS = "heatmaps/best_epoch.png"  # the best epoch's grid as a plain artifact
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # the best checkpoint: what predict/export/the pyfunc load, as data
TEST_SCORES = "test_scores.json"  # per-image test-set scores at the best epoch (test protocol data, for analysis)
TEST_PIXEL_COUNTS = "test_pixel_counts.npz"  # per-image pixel counts per map-value bin at the best epoch (metrics.pixel_counts)
REFERENCE_TEST_SCORES = "reference/test_scores.json"  # the same for the kNN reference on the same features
REFERENCE_PIXEL_COUNTS = "reference/test_pixel_counts.npz"
MODEL_OUTPUTS = (("scores", np.float32, (-1,)), ("normalized_scores", np.float32, (-1,)),
                 ("is_anomalous", np.bool_, (-1,)), ("anomaly_maps", np.float32, (-1, -1, -1)))


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
        if result.reference_scores:  # the kNN reference's own, for its row's intervals over seeds in a report
            self.client.log_dict(self.run_id, result.reference_scores, REFERENCE_TEST_SCORES)
        if result.reference_pixel_counts is not None:
            log_pixel_counts(self.client, self.run_id, result.reference_pixel_counts, REFERENCE_PIXEL_COUNTS)
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


PACKAGE = Path(__file__).resolve().parents[1]  # the `fastflow` package, logged with the model (`code_paths`)
PYFUNC_CODE = PACKAGE / "serve" / "mlflow_model.py"  # the pyfunc model, logged as code (never a pickle)


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
    """Log the checkpoint as an MLflow pyfunc *model from code* (`fastflow/serve/mlflow_model.py`, not a pickle) named
    after the run, with the `fastflow` package's code (`code_paths`), so it loads where the project is not
    installed; its URI goes into the tag `model_uri`."""
    client = MlflowClient()
    name = logged_model_name(category, client.get_run(run_id).info.run_name or run_id)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # its environment notices on every trial
    with warnings.catch_warnings(), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        warnings.simplefilter("ignore", UserWarning)  # type-hint and input-example notices; the signature is set
        info = mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_CODE),
                                       artifacts={"checkpoint": str(checkpoint_path)},
                                       code_paths=[str(PACKAGE)],
                                       signature=model_signature(), pip_requirements=pip_requirements())
    client.set_tag(run_id, "model_uri", info.model_uri)
    client.set_tag(run_id, "model_name", name)


def log_pixel_counts(client: MlflowClient, run_id: str, counts: tuple[np.ndarray, np.ndarray],
                     artifact: str = TEST_PIXEL_COUNTS) -> None:
    """`metrics.pixel_counts` (normal, defect) as the compressed array file `artifact`."""
    parent = Path(artifact).parent  # "." for a file at the artifact root
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact).name
        np.savez_compressed(path, normal=counts[0], defect=counts[1])
        client.log_artifact(run_id, str(path), None if parent == Path(".") else str(parent))


