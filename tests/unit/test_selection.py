"""Selection fidelity (fastflow.selection) and the protocol resolution of epochs and thresholds (fastflow.protocol)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastflow.engine.protocol import LEAK_FREE, PAPER, names_key, resolve_selection, resolve_threshold
from fastflow.engine.selection import (OPTIMISM_KEY, POINTS_KEY, RELIABILITY_KEY, SPEARMAN_KEY, fidelity,
                                       reliability_words, split_half_reliability)
from fastflow.engine.train import epoch_fidelity


def test_fidelity_of_constructed_sequences() -> None:
    test = [0.52, 0.60, 0.70, 0.65, 0.51]
    same_order = fidelity([0.80, 0.85, 0.95, 0.90, 0.79], test)
    assert same_order.spearman == pytest.approx(1.0) and same_order.optimism == 0.0 and same_order.points == 5
    reversed_order = fidelity([0.95, 0.90, 0.80, 0.85, 0.96], test)
    assert reversed_order.spearman == pytest.approx(-1.0)
    assert reversed_order.optimism == pytest.approx(0.70 - 0.51)  # chose the last epoch, the test set's worst
    # by hand: ranks val (1,3,2,5,4) vs test (2,3,5,4,1): d² = 1+0+9+1+9 = 20, rho = 1 - 6*20/(5*24) = 0
    assert fidelity([0.1, 0.3, 0.2, 0.5, 0.4], test).spearman == pytest.approx(0.0)
    # the index the selection chose (e.g. a tie broken by another validation metric) decides the optimism
    tied = fidelity([1.0, 1.0, 1.0, 0.9, 0.9], test, selected=2)
    assert tied.optimism == 0.0 and math.isnan(fidelity([1.0] * 5, test).spearman)  # saturated: no ranking
    assert fidelity([1.0] * 5, test).optimism == pytest.approx(0.70 - 0.52)  # first of the tie: epoch 1
    assert math.isnan(fidelity([0.1, 0.2], [0.3, 0.1]).spearman)  # too few points
    assert set(fidelity([1.0] * 5, test).metrics()) == {OPTIMISM_KEY, POINTS_KEY}  # NaN is not logged
    assert set(same_order.metrics()) == {SPEARMAN_KEY, OPTIMISM_KEY, POINTS_KEY}
    with pytest.raises(ValueError, match="one length"):
        fidelity([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="selected=7"):
        fidelity([0.1, 0.2], [0.1, 0.2], selected=7)


def test_epoch_fidelity_uses_evaluated_epochs_and_the_chosen_one() -> None:
    history = [{"epoch": 1, "train/loss": 3.0},
               {"epoch": 2, "eval/val_image_auroc": 0.8, "eval/image_auroc": 0.6},
               {"epoch": 3, "train/loss": 2.0},
               {"epoch": 4, "eval/val_image_auroc": 0.9, "eval/image_auroc": 0.5},
               {"epoch": 5, "eval/val_image_auroc": 0.7, "eval/image_auroc": 0.55}]
    labels = np.array([0] * 10 + [1] * 10)
    scores = {e: np.random.default_rng(e).normal(size=20) + labels * e for e in (2, 4, 5)}
    figures = epoch_fidelity(history, 4, scores, labels)
    assert figures.points == 3 and figures.optimism == pytest.approx(0.1) and figures.spearman == pytest.approx(-0.5)
    assert -1.0 <= figures.test_reliability <= 1.0 and RELIABILITY_KEY in figures.metrics()
    assert epoch_fidelity([{"epoch": 1, "eval/image_auroc": 0.6}], 1, scores, labels) is None  # no validation score


def test_split_half_reliability_tells_a_real_order_from_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 40)
    base = rng.normal(size=80) + labels
    # candidates that really differ (the defects stand out more and more): both halves agree on the order
    ordered = [base + labels * step + rng.normal(scale=0.05, size=80) for step in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert split_half_reliability(labels, ordered) > 0.9
    # candidates equal but for per-image jitter (a flat test curve): the halves' orders are unrelated
    flat = [base + rng.normal(scale=0.3, size=80) for _ in range(8)]
    assert abs(split_half_reliability(labels, flat)) < 0.3
    assert "noise" in reliability_words(-0.1) and "ranks" in reliability_words(0.8)
    assert math.isnan(split_half_reliability(labels, ordered[:2]))  # fewer than 3 candidates
    with pytest.raises(ValueError, match="one row of 80"):
        split_half_reliability(labels, [base[:10]] * 3)


def test_selection_is_leak_free_whenever_normals_are_held_out() -> None:
    protocol, ranking = resolve_selection("auto", has_validation=True)
    assert protocol is LEAK_FREE and ranking == LEAK_FREE.ranking
    protocol, ranking = resolve_selection("auto", has_validation=False)
    assert protocol is PAPER and ranking == PAPER.ranking
    protocol, ranking = resolve_selection("val_aupro", has_validation=True)
    assert protocol is LEAK_FREE and ranking == ("val_aupro", "val_image_auroc", "val_pixel_auroc")
    protocol, ranking = resolve_selection("pixel_auroc", has_validation=True)  # the paper protocol by choice
    assert protocol is PAPER and ranking == ("pixel_auroc", "image_auroc", "aupro")
    with pytest.raises(ValueError, match="val_image_auroc needs held-out normals"):
        resolve_selection("val_image_auroc", has_validation=False)
    # a leak-free tie is broken by the validation pixel metrics, never by a test metric
    epochs = [{"eval/val_image_auroc": 1.0, "eval/val_pixel_auroc": 0.90, "eval/image_auroc": 0.9},
              {"eval/val_image_auroc": 1.0, "eval/val_pixel_auroc": 0.95, "eval/image_auroc": 0.5}]
    _, ranking = resolve_selection("auto", True)
    assert max(range(2), key=lambda i: names_key(epochs[i], ranking, "eval/")) == 1


def test_threshold_source() -> None:
    assert resolve_threshold("auto", True, 0.99) == ("val_quantile", "leak-free: quantile 0.99 of held-out normal scores")
    assert resolve_threshold("auto", False, 0.99) == ("f1", "test-set: F1-max on test labels")
    assert resolve_threshold("f1", True, 0.99)[0] == "f1"
    with pytest.raises(ValueError, match="needs held-out normals"):
        resolve_threshold("val_quantile", False, 0.99)
