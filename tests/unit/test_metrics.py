"""Tests for fastflow.metrics."""

import math
from bisect import bisect

import numpy as np
import pytest
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score

from fastflow.core.metrics import (aupro, evaluate, f1_max, image_auroc, image_auroc_interval, pixel_auroc,
                                   pixel_auroc_interval, pixel_auroc_interval_of_counts, pixel_counts)


def _mvtec_aupro(masks, maps, x_max):
    """Straight port of the MVTec AD reference (compute_pro + trapezoid), loops and all."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i, gt in enumerate(masks):
        labeled, n = label(gt, structure)
        num_regions += n
        ok = labeled == 0
        num_ok += ok.sum()
        fp_changes[i][ok] = 1
        for k in range(n):
            region = labeled == k + 1
            pro_changes[i][region] = 1.0 / region.sum()
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    fprs = np.cumsum(fp_changes.ravel()[order]).astype(np.float32) / np.float32(num_ok)
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores[order]) != 0, True)
    x = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    y = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    m = x <= x_max
    x, y = x[m], y[m]
    return (np.sum(0.5 * (x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction) / x_max


def _two_image_case():
    """Two 1x4 images. Region R1 = A[0:2] (size 2), R2 = B[2] (size 1); 5 normal pixels.

    Scores, descending: 0.9 R1, 0.8 R2, 0.7 N, 0.6 N+R1 (tie), 0.3 N, 0.2 N, 0.1 N.
    Curve: (0,0) (0,.25) (0,.75) (.2,.75) (.4,1) (.6,1) (.8,1) (1,1) (1,1).
    """
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.6, 0.6, 0.1]], [[0.2, 0.7, 0.8, 0.3]]])
    return masks, maps


def _two_regions():
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 9:14, 1:3] = True
    return masks


def test_aupro_two_image_hand_case_interpolated():
    # fpr_limit 0.3 lies between (.2,.75) and (.4,1): y(.3) = .875.
    # Area = .2*.75 + .5*(.75+.875)*.1 = .23125; / .3
    masks, maps = _two_image_case()
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.23125 / 0.3, abs=1e-12)


def test_aupro_two_image_hand_case_limit_on_point():
    # fpr_limit 0.4 is a curve point: area = .15 + .5*(.75+1)*.2 = .325; / .4
    masks, maps = _two_image_case()
    assert aupro(masks, maps, fpr_limit=0.4) == pytest.approx(0.8125, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(
        0.15 + 0.175 + 0.6, abs=1e-12)


def test_perfect_and_inverted_maps():
    masks = _two_regions()
    perfect = masks.astype(np.float64)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, 1.0 - perfect) == pytest.approx(0.0)
    assert aupro(masks, 1.0 - perfect) == pytest.approx(0.0)


def test_aupro_constant_map_is_diagonal():
    # All scores tied: single curve point (1, 1), so PRO = FPR and AUPRO = fpr_limit / 2.
    masks = _two_regions()
    assert aupro(masks, np.full(masks.shape, 0.7), fpr_limit=0.3) == pytest.approx(0.15)
    assert pixel_auroc(masks, np.full(masks.shape, 0.7)) == pytest.approx(0.5)


def test_aupro_one_of_two_regions_scores_lower():
    masks = _two_regions()
    both = masks.astype(np.float64)
    one = both.copy()
    one[1] = 0.0  # region in image 1 scored like the background
    # Curve (0,0) (0,.5) (1,1): y(.3) = .65, area = .5*(.5+.65)*.3 -> normalized .575
    assert aupro(masks, one) == pytest.approx(0.575, abs=1e-12)
    assert aupro(masks, one) < aupro(masks, both)


def test_aupro_regions_use_8_connectivity():
    # Two diagonally touching pixels: one 8-connected region of size 2.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0  # detects half of the single region
    # Curve (0,0) (0,.5) (1,1) -> .575 (4-conn, 2 regions, would agree here).
    assert aupro(masks, maps) == pytest.approx(0.575, abs=1e-12)
    masks[0, 1, 2] = True  # 8-conn: one region {(0,0),(1,1),(1,2)} of size 3
    maps[0, 1, 1] = 0.5  # (1,2) stays at 0, missed until FPR 1
    # 8-conn: PRO 2/3 at FPR 0 -> curve (0,2/3) (1,1): y(.3) = 2/3 + .1.
    # 4-conn would see regions {(0,0)} and {(1,1),(1,2)}: PRO .75 -> different value.
    expected = 0.5 * (2 / 3 + (2 / 3 + 0.3 / 3))
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_mvtec_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = rng.random((5, 20, 24)) > 0.9  # many small scattered regions
    masks[0, 3:10, 4:12] = True
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)  # quantized -> many ties
    ours = aupro(masks, maps, fpr_limit=fpr_limit)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(_mvtec_aupro(masks, maps, fpr_limit), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((6, 32, 32)) > 0.85
    maps = rng.random(masks.shape) + 0.3 * masks
    ours = pixel_auroc(masks, maps)
    assert ours == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    tied = np.round(maps, 1).astype(np.float32)  # heavy ties
    assert pixel_auroc(masks, tied) == pytest.approx(
        roc_auc_score(masks.ravel(), tied.ravel()), abs=1e-12)


def test_image_auroc_hand_case():
    labels = np.array([0, 0, 1, 1])
    # Pairs (pos, neg): (.35,.1) win, (.35,.4) loss, (.8,*) wins -> 3/4
    assert image_auroc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert image_auroc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)


def test_f1_max_hand_case():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # t=.8: P1 R.5 F.667; t=.4: P.5 R.5 F.5; t=.35: P2/3 R1 F.8; t=.1: P.5 R1 F.667
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.35)


def test_single_class_labels_raise():
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError):
        f1_max(np.zeros(4), np.arange(4.0))


def test_nan_and_inf_raise_naming_input():
    masks = _two_regions()
    maps = masks.astype(np.float64)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="maps"):
        pixel_auroc(masks, bad)
    with pytest.raises(ValueError, match="maps"):
        aupro(masks, bad)
    with pytest.raises(ValueError, match="scores"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.inf]))
    with pytest.raises(ValueError, match="image_scores"):
        evaluate(np.array([0, 1]), np.array([np.nan, 1.0]), masks, maps)
    with pytest.raises(ValueError, match="maps"):
        evaluate(np.array([0, 1]), np.array([0.0, 1.0]), np.zeros_like(masks), bad)


def test_no_regions_raise():
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random(masks.shape)
    with pytest.raises(ValueError, match="region"):
        aupro(masks, maps)
    with pytest.raises(ValueError):
        pixel_auroc(masks, maps)


def test_evaluate_keys_and_values():
    masks = _two_regions()
    maps = masks.astype(np.float64)
    labels = np.array([1, 1, 0])
    scores = np.array([0.9, 0.8, 0.1])
    masks3 = np.concatenate([masks, np.zeros((1, 16, 16), dtype=bool)])
    maps3 = np.concatenate([maps, np.zeros((1, 16, 16))])
    out = evaluate(labels, scores, masks3, maps3)
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}
    assert out["image_auroc"] == pytest.approx(1.0)
    assert out["pixel_auroc"] == pytest.approx(1.0)
    assert out["aupro"] == pytest.approx(1.0)
    assert out["f1_max"] == pytest.approx(1.0)
    assert out["f1_threshold"] == pytest.approx(0.8)
    assert all(isinstance(v, float) for v in out.values())


def test_evaluate_omits_pixel_metrics_without_anomalous_pixels():
    masks = np.zeros((3, 8, 8), dtype=bool)
    maps = np.random.default_rng(1).random(masks.shape)
    out = evaluate(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.1]), masks, maps)
    assert set(out) == {"image_auroc", "f1_max", "f1_threshold"}
    assert out["image_auroc"] == pytest.approx(0.5)


# ---------------------------------------------------------------- bootstrap intervals over test images


def _hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """The classic closed-form standard error of an AUROC (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg))


def test_image_auroc_interval_brackets_the_estimate_with_the_textbook_width() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(41), np.ones(119)].astype(int)  # the screw test set's class sizes
    scores = rng.normal(size=160) + labels * 1.2
    auc = image_auroc(labels, scores)
    low, high = image_auroc_interval(labels, scores)
    assert low < auc < high
    expected = 2 * 1.96 * _hanley_mcneil_se(auc, 119, 41)
    assert (high - low) == pytest.approx(expected, rel=0.25)
    many = np.r_[np.zeros(410), np.ones(1190)].astype(int)  # ten times the images: about sqrt(10) narrower
    low10, high10 = image_auroc_interval(many, rng.normal(size=1600) + many * 1.2)
    assert (high10 - low10) < 0.45 * (high - low)


def test_image_auroc_interval_of_a_perfect_ranking_is_a_point_and_needs_both_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert image_auroc_interval(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == (1.0, 1.0)
    with pytest.raises(ValueError, match="both normal"):
        image_auroc_interval(np.ones(4, int), np.arange(4.0))


def test_pixel_auroc_interval_matches_a_plain_bootstrap_over_images() -> None:
    """The binned, vectorised bootstrap agrees with resampling whole images and calling pixel_auroc."""
    rng = np.random.default_rng(2)
    n, size = 24, 16
    masks = np.zeros((n, size, size), bool)
    for i in range(8, n):
        top, left = rng.integers(0, 10, 2)
        masks[i, top:top + 5, left:left + 5] = True
    maps = rng.normal(size=masks.shape) + 1.0 * masks + rng.normal(0, 0.7, (n, 1, 1))  # per-image offsets
    defective = np.flatnonzero(masks.any(axis=(1, 2)))
    good = np.flatnonzero(~masks.any(axis=(1, 2)))
    plain = []
    for _ in range(600):
        rows = np.r_[rng.choice(defective, len(defective)), rng.choice(good, len(good))]
        plain.append(pixel_auroc(masks[rows], maps[rows]))
    low, high = pixel_auroc_interval(masks, maps, resamples=2000)
    assert low == pytest.approx(np.quantile(plain, 0.025), abs=0.015)
    assert high == pytest.approx(np.quantile(plain, 0.975), abs=0.015)
    assert low < pixel_auroc(masks, maps) < high


def test_intervals_of_several_runs_are_those_of_their_mean() -> None:
    """Runs on the same test images (seeds): the interval is the mean AUROC's, each run scored on the same
    resampled images, so two identical runs give exactly one run's interval and a different run moves it."""
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(30), np.ones(60)].astype(int)
    one, other = rng.normal(size=90) + labels, rng.normal(size=90) + 0.3 * labels
    assert image_auroc_interval(labels, np.stack([one, one])) == pytest.approx(image_auroc_interval(labels, one))
    low, high = image_auroc_interval(labels, np.stack([one, other]))
    mean = (image_auroc(labels, one) + image_auroc(labels, other)) / 2
    assert low < mean < high and high < image_auroc_interval(labels, one)[1]
    masks = np.zeros((20, 12, 12), bool)
    masks[10:, 3:7, 3:7] = True
    maps = rng.normal(size=masks.shape) + masks
    counts = pixel_counts(masks, maps)
    assert counts[0].sum() + counts[1].sum() == masks.size and counts[1].sum() == masks.sum()
    assert pixel_auroc_interval_of_counts([counts, counts]) == pytest.approx(pixel_auroc_interval(masks, maps))
