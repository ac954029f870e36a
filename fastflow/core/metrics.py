"""Anomaly-detection metrics: image/pixel AUROC, MVTec AUPRO and max-F1.

Pure numpy / scipy / scikit-learn. Array shape conventions:
    labels (N,) 0/1 image labels, scores (N,) image anomaly scores,
    masks (N, H, W) bool or 0/1 ground truth, maps (N, H, W) float anomaly maps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import bootstrap, mannwhitneyu
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "evaluate", "image_auroc_interval",
           "pixel_auroc_interval", "pixel_counts", "pixel_auroc_interval_of_counts", "INTERVAL_LEVEL",
           "INTERVAL_METRICS", "interval_keys", "OFF_DEFECT"]

INTERVAL_LEVEL = 0.95  # the confidence level of every interval the harness prints or logs
INTERVAL_METRICS = ("image_auroc", "pixel_auroc", "val_image_auroc")  # the AUROCs each run logs an interval of
# A diagnostic, never a selection metric: the image AUROC with each defective image scored with its defect region
# left out (`scoring.off_defect_scores`). Near the image AUROC: the score ranks images by what lies off the defects
# (lighting, texture, position), not by the defects; near or under 0.5: it detects the defects.
OFF_DEFECT = "off_defect_image_auroc"


def interval_keys(metric: str) -> tuple[str, str]:
    """The metric keys of `metric`'s bootstrap interval, e.g. `image_auroc_ci_low`, `image_auroc_ci_high`."""
    return f"{metric}_ci_low", f"{metric}_ci_high"


class NonFiniteError(ValueError):
    """Scores or maps hold NaN/inf (a diverged model)."""


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    """Return `values` as an array, raising ValueError if it holds NaN/inf."""
    arr = np.asarray(values)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{name} contains NaN or inf values")
    return arr


def _binary_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Validate (N,) 0/1 labels matching `n` scores; return them as bool."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels shape {lab.shape} does not match scores shape ({n},)")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must contain only 0/1 (or bool) values")
    return lab.astype(bool)


def _pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,H,W) masks/maps; return (bool masks, finite maps)."""
    amap = _finite("maps", maps)
    gt = np.asarray(masks)
    if amap.ndim != 3 or gt.shape != amap.shape:
        raise ValueError(f"masks {gt.shape} and maps {amap.shape} must both be (N, H, W)")
    return gt != 0, amap


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level ROC AUC. labels (N,) 0/1, scores (N,) higher = more anomalous."""
    s = _finite("scores", scores).ravel()
    y = _binary_labels(labels, s.size)
    if y.all() or not y.any():
        raise ValueError("image_auroc needs both normal (0) and anomalous (1) labels; "
                         "only one class is present")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level ROC AUC over all pixels. masks (N,H,W), maps (N,H,W).

    Exact Mann-Whitney form (ties count 1/2), equal to sklearn's roc_auc_score
    up to float rounding but several times faster: sorts only the normal
    pixels and binary-searches the anomalous ones.
    """
    gt, amap = _pixels(masks, maps)
    gt, s = gt.ravel(), amap.ravel()
    pos, neg = np.sort(s[gt]), np.sort(s[~gt])
    if pos.size == 0 or neg.size == 0:
        raise ValueError("pixel_auroc needs both normal and anomalous pixels in masks")
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_tied)) / (2 * pos.size * neg.size))


def _region_weights(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """1/|region| for every ground-truth pixel, in flat (ravel) order, and #regions.

    Regions are 8-connected components (3x3 ones, as in MVTec) of each image;
    the 3D structure has no links along axis 0, so images never merge.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labeled, n_regions = ndimage.label(gt, structure=structure)
    region_ids = labeled.ravel()[gt.ravel()]
    sizes = np.bincount(region_ids, minlength=n_regions + 1)
    return 1.0 / sizes[region_ids], int(n_regions)


def _pro_curve(gt: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) curve of MVTec `compute_pro`, as two float64 arrays (0,0) ... (1,1).

    MVTec puts a point at every distinct score. Here only the points at distinct
    anomalous-pixel scores q are kept, each preceded by (FPR of scores > q, previous
    PRO); the dropped points lie on horizontal segments, so areas and the
    interpolation at any x_max are unchanged (up to float rounding; MVTec also
    keeps FPRs in float32). Normal pixels are sorted once, anomalous ones once.
    """
    weights, n_regions = _region_weights(gt)
    if n_regions == 0:
        raise ValueError("aupro needs at least one ground-truth region in masks")
    scores, flat_gt = amap.ravel(), gt.ravel()
    neg = np.sort(scores[~flat_gt])
    if neg.size == 0:
        raise ValueError("aupro needs at least one normal pixel in masks")
    pos = scores[flat_gt]
    order = np.argsort(pos)[::-1]
    q = pos[order]
    pro = np.cumsum(weights[order]) / n_regions
    last = np.append(np.diff(q) != 0, True)  # last point of each tie
    q, pro = q[last], np.minimum(pro[last], 1.0)
    fpr_ge = (neg.size - np.searchsorted(neg, q, side="left")) / neg.size
    fpr_gt = (neg.size - np.searchsorted(neg, q, side="right")) / neg.size
    pro_before = np.concatenate(([0.0], pro[:-1]))
    fprs = np.column_stack([fpr_gt, fpr_ge]).ravel()
    pros = np.column_stack([pro_before, pro]).ravel()
    return (np.concatenate(([0.0], fprs, [1.0, 1.0])),
            np.concatenate(([0.0], pros, [pro[-1], 1.0])))


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under (x, y) on [0, x_max], interpolating y at x_max (MVTec `trapezoid`)."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # == bisect.bisect
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    inside = x <= x_max
    x, y = x[inside], y[inside]
    return float(np.sum(0.5 * np.diff(x) * (y[1:] + y[:-1])) + correction)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap curve up to `fpr_limit`.

    masks (N,H,W), maps (N,H,W). Same semantics as the MVTec AD evaluation
    code (`compute_pro` + `trapezoid(x_max=fpr_limit)` / fpr_limit), regions
    being 8-connected components per image. A perfect map gives 1.0.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    gt, amap = _pixels(masks, maps)
    fprs, pros = _pro_curve(gt, amap)
    return _trapezoid(fprs, pros, fpr_limit) / fpr_limit


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, score threshold achieving it); predicts anomalous when score >= threshold.

    labels (N,) 0/1 with at least one 1, scores (N,).
    """
    s = _finite("scores", scores).ravel()
    y = _binary_labels(labels, s.size)
    if not y.any():
        raise ValueError("f1_max needs at least one anomalous (1) label")
    precision, recall, thresholds = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1[:-1]))  # last PR point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def evaluate(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray,
             maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """All metrics: labels/image_scores (N,), masks/maps (N,H,W).

    Keys: image_auroc, f1_max, f1_threshold, and, only when masks contain an
    anomalous pixel, pixel_auroc and aupro.
    """
    _finite("image_scores", image_scores)
    gt, _ = _pixels(masks, maps)
    f1, threshold = f1_max(labels, image_scores)
    out = {"image_auroc": image_auroc(labels, image_scores),
           "f1_max": f1, "f1_threshold": threshold}
    if gt.any():
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps, fpr_limit)
    return out


def _mean_auroc(anomalous: np.ndarray, normal: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC of anomalous vs normal scores along `axis` (Mann-Whitney U / (n1 n0), ties count 1/2), averaged over
    the leading axis of runs: `(runs, ..., n)` -> `(...)`."""
    u = mannwhitneyu(anomalous, normal, axis=axis, method="asymptotic", use_continuity=False).statistic
    return (u / (anomalous.shape[axis] * normal.shape[axis])).mean(axis=0)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def image_auroc_interval(labels: np.ndarray, scores: np.ndarray, level: float = INTERVAL_LEVEL,
                         resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the image AUROC over test images: normal and anomalous images are resampled
    separately (stratified, so every resample has both classes), percentile method (scipy.stats.bootstrap).
    `scores` `(N,)`, or `(runs, N)` for runs on the same images (seeds): then the interval of their mean AUROC,
    every run scored on the same resampled images."""
    runs = np.atleast_2d(_finite("scores", scores))
    y = _binary_labels(labels, runs.shape[1])
    if y.all() or not y.any():
        raise ValueError("image_auroc_interval needs both normal (0) and anomalous (1) labels")
    indices = np.arange(runs.shape[1])

    def statistic(anomalous: np.ndarray, normal: np.ndarray, axis: int = -1) -> np.ndarray:
        return _mean_auroc(runs[:, anomalous.astype(int)], runs[:, normal.astype(int)], axis=axis)

    result = bootstrap((indices[y], indices[~y]), statistic, n_resamples=resamples, confidence_level=level,
                       method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def pixel_counts(masks: np.ndarray, maps: np.ndarray, bins: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each image's normal and defect pixels counted in `bins` quantile bins of the split's map values:
    (normal, defect), both `(N, bins)`. Enough to recompute the pixel AUROC of any resample of whole images (up to
    ties within a bin, which move it by well under 1e-3), for this run and together with other runs."""
    gt, amap = _pixels(masks, maps)
    sample = amap.ravel()[:: max(1, amap.size // (bins * 256))]  # quantile edges from a regular subsample
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, bins + 1)[1:-1]))
    which = np.searchsorted(edges, amap.reshape(len(amap), -1), side="right") + bins * np.arange(len(amap))[:, None]
    count = lambda keep: np.bincount(which[keep.reshape(len(amap), -1)], minlength=len(amap) * bins).reshape(len(amap), bins)
    return count(~gt), count(gt)


def pixel_auroc_interval_of_counts(counts: list[tuple[np.ndarray, np.ndarray]], level: float = INTERVAL_LEVEL,
                                   resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval over test images of the mean pixel AUROC of runs on the same images, from each run's
    `pixel_counts`: whole images are resampled (those with and without defect pixels separately), every run on the
    same resampled images."""
    defect_pixels = counts[0][1].sum(axis=1)
    if not defect_pixels.any() or not all(c[0].any() for c in counts):
        raise ValueError("pixel_auroc_interval needs both normal and anomalous pixels in masks")
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(defect_pixels)))
    for group in (np.flatnonzero(defect_pixels > 0), np.flatnonzero(defect_pixels == 0)):
        if len(group):
            picks = group[rng.integers(0, len(group), size=(resamples, len(group)))]
            np.add.at(weights, (np.arange(resamples)[:, None], picks), 1.0)
    aurocs = []
    for normal, defect in counts:
        neg, pos = weights @ normal, weights @ defect  # (resamples, bins)
        below = np.cumsum(neg, axis=1) - neg  # normal pixels in lower bins
        aurocs.append((pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1)))
    return _percentiles(np.mean(aurocs, axis=0), level)


def pixel_auroc_interval(masks: np.ndarray, maps: np.ndarray, level: float = INTERVAL_LEVEL, resamples: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the pixel AUROC over test images (whole images resampled with their pixels; images
    with and without defect pixels separately), from `pixel_counts`."""
    gt, _ = _pixels(masks, maps)
    if not gt.any() or gt.all():
        raise ValueError("pixel_auroc_interval needs both normal and anomalous pixels in masks")
    return pixel_auroc_interval_of_counts([pixel_counts(masks, maps)], level, resamples, seed)
