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
from pathlib import Path
from typing import Callable


from fastflow.core import metrics as M
from fastflow.core.knn import KnnRecipe, knn_maps
from fastflow.core.scoring import ScoreSettings, off_defect_scores
from fastflow.data.features import EncodedSplit
from fastflow.runtime.config import RunConfig

log = logging.getLogger(__name__)

PREFIX = "reference/"  # the metric keys' prefix: reference/image_auroc, reference/pixel_auroc, ...
LABEL = "kNN on the same features"  # how pages and reports name the reference
REFERENCE_FORMAT = 1  # bump when what is stored changes
CACHE_FOLDER = ".reference"  # under the feature cache directory; a leading dot keeps it out of LRU eviction


def reference_metrics(train: EncodedSplit, test: EncodedSplit, strides: list[int], size: int,
                      recipe: KnnRecipe = KnnRecipe(), aupro_fpr_limit: float = 0.3) -> dict[str, float]:
    """`reference/<metric>` of the kNN reference on the test split: image AUROC with its bootstrap interval over
    test images, pixel AUROC with its interval, AUPRO, the off-defect image AUROC, and the seconds it took."""
    start = time.perf_counter()
    maps, scores = knn_maps(train.features, test.features, strides, (size, size), recipe)
    labels, masks = test.labels.numpy(), test.masks
    values = {"image_auroc": M.image_auroc(labels, scores.numpy())}
    values.update(zip(M.interval_keys("image_auroc"), M.image_auroc_interval(labels, scores.numpy())))
    if bool(masks.any()):
        gt, amap = masks[:, 0].numpy(), maps[:, 0].numpy()
        values["pixel_auroc"] = M.pixel_auroc(gt, amap)
        values.update(zip(M.interval_keys("pixel_auroc"), M.pixel_auroc_interval_of_counts([M.pixel_counts(gt, amap)])))
        values["aupro"] = M.aupro(gt, amap, aupro_fpr_limit)
        off_defect = off_defect_scores(maps, masks, ScoreSettings(image_score="max"))
        values[M.OFF_DEFECT] = M.image_auroc(labels, off_defect.numpy())
    values["seconds"] = time.perf_counter() - start
    return {PREFIX + k: float(v) for k, v in values.items()}


def reference_key(train_key: str, test_key: str, recipe: KnnRecipe, aupro_fpr_limit: float) -> str:
    """The cache name of a reference: its two feature-cache entries and the recipe."""
    text = json.dumps([train_key, test_key, recipe.key(), aupro_fpr_limit, REFERENCE_FORMAT])
    return f"knn-{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _read(path: Path) -> dict[str, float] | None:
    """A stored reference, or None when it is missing or cannot be trusted (it is then recomputed and replaced)."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable kNN reference %s (%s); it is recomputed", path, error)
        return None
    if not (isinstance(values, dict) and values and all(
            isinstance(k, str) and k.startswith(PREFIX) and isinstance(v, (int, float)) for k, v in values.items())):
        log.warning("ignoring kNN reference %s: not a mapping of %s* numbers; it is recomputed", path, PREFIX)
        return None
    return {k: float(v) for k, v in values.items()}


def _write(path: Path, values: dict[str, float]) -> None:
    """Atomically (a temporary file renamed into place): readers see the old, the new or no file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(values, indent=1, sort_keys=True))
    os.replace(staging, path)


def cached_reference(directory: Path | None, key: str, compute) -> tuple[dict[str, float], bool]:
    """(the reference's metrics, whether they came from the cache); `compute()` runs on a miss. Without a cache
    directory (`train.feature_cache` memory/off) it is computed every time."""
    path = Path(directory) / CACHE_FOLDER / f"{key}.json" if directory is not None else None
    stored = _read(path) if path is not None else None
    if stored is not None:
        return stored, True
    values = compute()
    if path is not None:
        _write(path, values)
    return values, False


def knn_reference(cfg: RunConfig, strides: list[int], train_features: Callable[[], EncodedSplit], encoded,
                  recipe: KnnRecipe = KnnRecipe()) -> dict[str, float]:
    """The run's `reference/<metric>` values: read back when this pair of feature-cache entries (`encoded.keys`, an
    `engine.encode.Encoded`) already has them, else computed from `train_features()` and `encoded.test` and stored
    beside the feature cache."""
    directory = Path(cfg.train.cache_dir) if cfg.train.feature_cache == "disk" else None
    key = reference_key(encoded.keys["train"], encoded.keys["test"], recipe, cfg.eval.aupro_fpr_limit)
    values, cached = cached_reference(directory, key, lambda: reference_metrics(
        train_features(), encoded.test, strides, cfg.model.input_size, recipe, cfg.eval.aupro_fpr_limit))
    log.info("%s: image AUROC %.3f [%.3f, %.3f]%s", LABEL, values[PREFIX + "image_auroc"],
             values[PREFIX + "image_auroc_ci_low"], values[PREFIX + "image_auroc_ci_high"],
             " (cached)" if cached else "")
    return values
