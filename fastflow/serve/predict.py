"""`fastflow predict`: score images with a trained model; heatmap overlays, binary masks, results.csv/json.

The model is a `models:/<name>@<alias>` or `runs:/<id>/model` URI, a bare 32-hex run id (its logged
`model`), or a checkpoint `.pt` file. Images may have any size and mode; the map is computed at the
model's input size and upsampled (bilinear) to each image's original size.

Mask rule: a pixel is anomalous when its upsampled map value exceeds the image threshold, or when the
model-resolution pixel it comes from does (nearest neighbour). With `model.image_score=max` the image
score is the map's maximum, so an image is flagged exactly when its mask is non-empty (for images at
least as large as the model input); with `topk` a normal image may still show a few mask pixels.
The map is the one the image score reads: with `model.score_norm=position` the held-out-standardised map.

Interrupted (Ctrl-C, SIGTERM): the images scored so far are written to results.csv/json (`interrupted: true`,
with how many of how many), and the CLI's last line says so. A re-run starts clean: it scores every image
again and replaces the results (simple and never mixes two models' or thresholds' rows).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fastflow.data.dataset import IMAGE_SUFFIXES, load_rgb
from fastflow.pages.visualize import colorize, overlay
from fastflow.serve.inference import Predictor

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MASK_RULE = "map > image threshold (bilinear map at the original size, or its model-resolution pixel)"


@dataclass
class PredictionRow:
    image: str
    width: int
    height: int
    score: float  # raw image score
    normalized_score: float  # in [0, 1]; the threshold maps to 0.5
    is_anomalous: bool
    threshold_kind: str
    threshold: float
    anomalous_fraction: float  # share of mask pixels
    overlay: str  # relative to the output folder
    mask: str


def load_logged_predictor(uri: str) -> Predictor:
    """A registered or logged model -> its `inference.Predictor`, from the run's checkpoint read as data
    (`weights_only`); never through `mlflow.pyfunc.load_model`, which would run the model's stored code."""
    from fastflow.tracking.logger import CHECKPOINT_ARTIFACT
    from fastflow.tracking.registry import model_run_id
    from fastflow.tracking.results import download_checkpoint

    run_id = model_run_id(uri)
    with tempfile.TemporaryDirectory() as folder:
        path = download_checkpoint(run_id, Path(folder))
        return Predictor.from_file(path, label=f"{uri} (run {run_id}, artifact {CHECKPOINT_ARTIFACT})")


def load_predictor(model: str, device: str = "cpu") -> Predictor:
    """A URI, run id or checkpoint path -> Predictor (MLflow store: $MLFLOW_TRACKING_URI or ./mlruns)."""
    if model.startswith(("models:/", "runs:/")) or RUN_ID.match(model):
        predictor = load_logged_predictor(model)  # the run's checkpoint, read as data
        predictor.device = torch.device(device)
        return predictor.to(device)
    path = Path(model)
    if path.is_file():
        return Predictor.from_file(path, device)
    raise FileNotFoundError(f"model not found: {model!r}; expected models:/<name>@<alias>, models:/<name>/<version>, "
                            f"runs:/<run id>/model, a 32-hex run id or a checkpoint .pt file")


def select_threshold(predictor: Predictor, kind: Optional[str]) -> None:
    """Use the stored threshold `kind` (f1 | val_quantile); None keeps the one chosen at training."""
    if kind is None:
        return
    if kind not in predictor.thresholds:
        raise ValueError(f"threshold '{kind}' is not stored in this model; stored: {', '.join(predictor.thresholds)}")
    predictor.threshold_kind, predictor.threshold = kind, float(predictor.thresholds[kind])


def list_inputs(source: str, exclude: Optional[Path] = None) -> tuple[list[Path], list[Path]]:
    """A file, a folder (recursively) or a glob pattern -> sorted (images, other files); files below
    `exclude` (the output folder) are left out.

    Files without an image suffix are skipped with a warning; no image at all raises FileNotFoundError.
    """
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"input not found: {source} (expected an image, a folder or a glob pattern)")
    if exclude is not None:
        excluded = exclude.resolve()
        files = [p for p in files if excluded not in p.resolve().parents]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    for file in others:
        log.warning("skipping %s: not an image (suffixes: %s)", file, ", ".join(sorted(IMAGE_SUFFIXES)))
    if not images:
        raise FileNotFoundError(f"no images in input {source} ({len(others)} other files)")
    return images, others


def output_names(paths: list[Path]) -> list[str]:
    """Unique file-name stems: the path below the inputs' common folder, '/' -> '__'."""
    parents = [str(p.resolve().parent) for p in paths]
    base = Path(parents[0]) if len(set(parents)) == 1 else Path(os.path.commonpath(parents))
    names, seen = [], set()
    for path in paths:
        stem = "__".join(path.resolve().with_suffix("").relative_to(base).parts)
        name, count = stem, 2
        while name in seen:
            name, count = f"{stem}_{count}", count + 1
        seen.add(name)
        names.append(name)
    return names


def upsample(score_map: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """`(S,S)` -> `(height,width)`."""
    tensor = torch.from_numpy(np.ascontiguousarray(score_map, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=(height, width), mode=mode, **kwargs)[0, 0].numpy()


def save_outputs(predictor: Predictor, image: Image.Image, score_map: np.ndarray, out: Path,
                 name: str) -> tuple[str, str, float]:
    """Heatmap overlay and binary mask PNGs at the image's size -> (overlay, mask, anomalous fraction)."""
    width, height = image.size
    full = upsample(score_map, height, width)
    at_model = upsample((score_map >= predictor.threshold).astype(np.float32), height, width, "nearest") > 0.5
    mask = (full >= predictor.threshold) | at_model
    heat = colorize(predictor.normalize(full), 0.0, 1.0)  # the threshold is the middle of the colour scale
    overlay_name, mask_name = f"{name}_overlay.png", f"{name}_mask.png"
    Image.fromarray(overlay(np.asarray(image), heat)).save(out / overlay_name)
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(out / mask_name)
    return overlay_name, mask_name, float(mask.mean())


def _load_batch(paths: list[Path]) -> list[tuple[int, Image.Image]]:
    loaded = []
    for index, path in enumerate(paths):
        try:
            loaded.append((index, load_rgb(path)))
        except ValueError as error:
            log.warning("skipping %s: %s", path, error)
    return loaded


def predict_paths(predictor: Predictor, paths: list[Path], out: Path, batch_size: int = 16,
                  rows: Optional[list[PredictionRow]] = None) -> list[PredictionRow]:
    """Score `paths` in batches (unreadable images are skipped with a warning); write PNGs into `out`. Rows are
    appended to `rows` (a new list by default) as each image is done, so an interruption keeps them."""
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    rows = [] if rows is None else rows
    with tqdm(total=len(paths), desc="predict", unit="img") as progress:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            loaded = _load_batch(batch)
            if loaded:
                result = predictor.predict_images([image for _, image in loaded])
                for k, (index, image) in enumerate(loaded):
                    overlay_name, mask_name, fraction = save_outputs(predictor, image, result.maps[k], out,
                                                                     names[start + index])
                    rows.append(PredictionRow(str(batch[index]), image.size[0], image.size[1],
                                              float(result.scores[k]), float(result.normalized[k]),
                                              bool(result.is_anomalous[k]), predictor.threshold_kind,
                                              predictor.threshold, fraction, overlay_name, mask_name))
            progress.update(len(batch))
    return rows


def write_results(rows: list[PredictionRow], out: Path, predictor: Predictor, model: str, source: str,
                  skipped: list[str], total: Optional[int] = None) -> None:
    """`results.csv` (one row per image) and `results.json` (settings + rows + skipped files), each replaced
    whole (written aside, then renamed). `total`: the images there were to score when interrupted before the
    end (`interrupted: true` in results.json)."""
    partial = out / "results.csv.partial"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(PredictionRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    os.replace(partial, out / "results.csv")
    summary = {"model": model, "input": source, "input_size": predictor.cfg.model.input_size,
               "anomaly_map": predictor.cfg.model.anomaly_map, "image_score": predictor.cfg.model.image_score,
               "threshold_kind": predictor.threshold_kind, "threshold": predictor.threshold,
               "thresholds": {k: float(v) for k, v in predictor.thresholds.items()},
               "score_range": list(predictor.score_range), "mask_rule": MASK_RULE,
               "interrupted": total is not None, "images_to_score": len(rows) if total is None else total,
               "images": [asdict(row) for row in rows], "skipped": skipped}
    (out / "results.json.partial").write_text(json.dumps(summary, indent=1))
    os.replace(out / "results.json.partial", out / "results.json")


def predict(model: str, source: str, out: Path, threshold: Optional[str] = None, batch_size: int = 16,
            device: str = "cpu") -> list[PredictionRow]:
    """Load `model`, score every image of `source` (file, folder or glob) and write results into `out`.

    Returns one row per scored image; raises FileNotFoundError when `source` holds no readable image.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out)
    paths, others = list_inputs(source, exclude=out)
    predictor = load_predictor(model, device)
    select_threshold(predictor, threshold)
    rows: list[PredictionRow] = []
    try:
        predict_paths(predictor, paths, out, batch_size, rows)
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: keep and say what was done
        write_results(rows, out, predictor, model, source, [str(p) for p in others], total=len(paths))
        error.account = (f"{len(rows)} of {len(paths)} images scored before the interruption; their results are in "
                         f"{out / 'results.csv'} and results.json; a re-run scores every image again")
        raise
    scored = {row.image for row in rows}
    skipped = [str(p) for p in paths if str(p) not in scored] + [str(p) for p in others]
    if not rows:
        raise FileNotFoundError(f"no readable images in input {source} ({len(skipped)} files skipped)")
    write_results(rows, out, predictor, model, source, skipped)
    return rows


__all__ = ["predict", "load_predictor", "list_inputs", "predict_paths", "PredictionRow", "MASK_RULE"]
