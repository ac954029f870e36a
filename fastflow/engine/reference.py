"""The kNN feature reference of a run: `core.knn` on the run's own cached backbone features, its metrics, and a
small JSON cache beside the feature cache so that it is computed once per pair of feature-cache entries.

Leak-free by construction: the memory bank holds training patches only and no choice reads a test label; the
test labels only score it, as they score the flows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fastflow.core import metrics as M
from fastflow.core.knn import KnnRecipe, knn_maps
from fastflow.core.scoring import ScoreSettings, off_defect_scores
from fastflow.data.features import EncodedSplit
from fastflow.runtime.config import RunConfig

log = logging.getLogger(__name__)

PREFIX = "reference/"  # the metric keys' prefix: reference/image_auroc, reference/pixel_auroc, ...
LABEL = "kNN on the same features"  # how pages and reports name the reference
REFERENCE_FORMAT = 2  # bump when what is stored changes (2: per-image scores and binned pixels beside the metrics)
CACHE_FOLDER = ".reference"  # under the feature cache directory; a leading dot keeps it out of LRU eviction


@dataclass
class Reference:
    """The kNN reference of one pair of feature-cache entries: its `reference/<metric>` values, and what a report
    needs to put a bootstrap interval over test images on a mean over seeds (as for the flows' own rows): each test
    image's score, and the test pixels binned per image (`metrics.pixel_counts`: normal, defect; None without
    masks)."""

    metrics: dict[str, float]
    image_scores: list[float] = field(default_factory=list)  # in the test split's order
    pixel_counts: tuple[np.ndarray, np.ndarray] | None = None


def reference_metrics(train: EncodedSplit, test: EncodedSplit, strides: list[int], size: int,
                      recipe: KnnRecipe = KnnRecipe(), aupro_fpr_limit: float = 0.3) -> Reference:
    """The kNN reference on the test split: image AUROC with its bootstrap interval over test images, pixel AUROC
    with its interval, AUPRO, the off-defect image AUROC and the seconds it took (`reference/<metric>`), and the
    per-image scores and binned pixels behind them."""
    start = time.perf_counter()
    maps, scores = knn_maps(train.features, test.features, strides, (size, size), recipe)
    labels, masks = test.labels.numpy(), test.masks
    values = {"image_auroc": M.image_auroc(labels, scores.numpy())}
    values.update(zip(M.interval_keys("image_auroc"), M.image_auroc_interval(labels, scores.numpy())))
    counts = None
    if bool(masks.any()):
        gt, amap = masks[:, 0].numpy(), maps[:, 0].numpy()
        counts = M.pixel_counts(gt, amap)
        values["pixel_auroc"] = M.pixel_auroc(gt, amap)
        values.update(zip(M.interval_keys("pixel_auroc"), M.pixel_auroc_interval_of_counts([counts])))
        values["aupro"] = M.aupro(gt, amap, aupro_fpr_limit)
        off_defect = off_defect_scores(maps, masks, ScoreSettings(image_score="max"))
        values[M.OFF_DEFECT] = M.image_auroc(labels, off_defect.numpy())
    values["seconds"] = time.perf_counter() - start
    return Reference({PREFIX + k: float(v) for k, v in values.items()}, scores.tolist(), counts)


def reference_key(train_key: str, test_key: str, recipe: KnnRecipe, aupro_fpr_limit: float) -> str:
    """The cache name of a reference: its two feature-cache entries and the recipe."""
    text = json.dumps([train_key, test_key, recipe.key(), aupro_fpr_limit, REFERENCE_FORMAT])
    return f"knn-{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _numbers(value, depth: int) -> bool:
    """`value` is a list (nested `depth` deep) of numbers."""
    if depth == 0:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) and all(_numbers(item, depth - 1) for item in value)


def _read(path: Path) -> Reference | None:
    """A stored reference, or None when it is missing or cannot be trusted (it is then recomputed and replaced)."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable kNN reference %s (%s); it is recomputed", path, error)
        return None
    metrics = stored.get("metrics") if isinstance(stored, dict) else None
    counts = stored.get("pixel_counts") if isinstance(stored, dict) else None
    if not (isinstance(metrics, dict) and metrics and all(
            isinstance(k, str) and k.startswith(PREFIX) and _numbers(v, 0) for k, v in metrics.items())
            and _numbers(stored.get("image_scores"), 1) and (counts is None or (
                isinstance(counts, list) and len(counts) == 2 and all(_numbers(c, 2) for c in counts)))):
        log.warning("ignoring kNN reference %s: not {metrics: {%s*: number}, image_scores: [number], pixel_counts}; "
                    "it is recomputed", path, PREFIX)
        return None
    return Reference({k: float(v) for k, v in metrics.items()}, [float(v) for v in stored["image_scores"]],
                     None if counts is None else (np.asarray(counts[0], np.int64), np.asarray(counts[1], np.int64)))


def _write(path: Path, reference: Reference) -> None:
    """Atomically (a temporary file renamed into place): readers see the old, the new or no file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    counts = None if reference.pixel_counts is None else [c.tolist() for c in reference.pixel_counts]
    staging.write_text(json.dumps({"metrics": reference.metrics, "image_scores": reference.image_scores,
                                   "pixel_counts": counts}, sort_keys=True))
    os.replace(staging, path)


def cached_reference(directory: Path | None, key: str, compute: Callable[[], Reference]) -> tuple[Reference, bool]:
    """(the reference, whether it came from the cache); `compute()` runs on a miss. Without a cache
    directory (`train.feature_cache` memory/off) it is computed every time."""
    path = Path(directory) / CACHE_FOLDER / f"{key}.json" if directory is not None else None
    stored = _read(path) if path is not None else None
    if stored is not None:
        return stored, True
    reference = compute()
    if path is not None:
        _write(path, reference)
    return reference, False


def knn_reference(cfg: RunConfig, strides: list[int], train_features: Callable[[], EncodedSplit], encoded,
                  recipe: KnnRecipe = KnnRecipe()) -> Reference:
    """The run's kNN reference: read back when this pair of feature-cache entries (`encoded.keys`, an
    `engine.encode.Encoded`) already has it, else computed from `train_features()` and `encoded.test` and stored
    beside the feature cache."""
    directory = Path(cfg.train.cache_dir) if cfg.train.feature_cache == "disk" else None
    key = reference_key(encoded.keys["train"], encoded.keys["test"], recipe, cfg.eval.aupro_fpr_limit)
    reference, cached = cached_reference(directory, key, lambda: reference_metrics(
        train_features(), encoded.test, strides, cfg.model.input_size, recipe, cfg.eval.aupro_fpr_limit))
    values = reference.metrics
    log.info("%s: image AUROC %.3f [%.3f, %.3f]%s", LABEL, values[PREFIX + "image_auroc"],
             values[PREFIX + "image_auroc_ci_low"], values[PREFIX + "image_auroc_ci_high"],
             " (cached)" if cached else "")
    return reference
