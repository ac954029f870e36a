"""Selection fidelity: can a choice made on the validation score be trusted on the test set? (no I/O)

Over the candidates one selection chose among (the evaluated epochs of a run, the complete trials of a study):
- `spearman`: Spearman rank correlation between the validation and the test image AUROC; near 1, the
  validation score orders candidates as the test set does; near 0 or below, it orders them by chance or worse.
- `optimism`: test AUROC of the best candidate by test minus that of the candidate the selection chose;
  0 when the choice is also the test set's best. Choosing on the test set instead would report this much more
  than a user will see on new parts.
- `test_reliability`: how far the test set itself can rank the candidates: the Spearman correlation between
  their image AUROCs on two disjoint halves of the test set (stratified by label), averaged over random
  splits. Near 0 or below, two test sets of half the size would disagree on the order of the candidates, so
  no validation score can reach a high `spearman` against this test set: its order is noise (typically when
  the candidates' test AUROCs differ by less than the test set resolves). Test-derived: a diagnostic of the
  test set, never used to choose anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

from fastflow.core.metrics import image_auroc

SPEARMAN_KEY = "fidelity/spearman"
OPTIMISM_KEY = "fidelity/optimism"
POINTS_KEY = "fidelity/points"
RELIABILITY_KEY = "fidelity/test_reliability"


@dataclass(frozen=True)
class Fidelity:
    spearman: float  # NaN when undefined (fewer than 3 points, or a constant sequence)
    optimism: float
    points: int
    test_reliability: float = math.nan  # NaN when not measured (no per-image test scores)

    def metrics(self) -> dict[str, float]:
        """Finite figures under their metric keys (NaN is left out: it cannot be logged)."""
        values = {SPEARMAN_KEY: self.spearman, OPTIMISM_KEY: self.optimism, POINTS_KEY: float(self.points),
                  RELIABILITY_KEY: self.test_reliability}
        return {k: v for k, v in values.items() if math.isfinite(v)}


def fidelity(validation: Sequence[float], test: Sequence[float], selected: Optional[int] = None) -> Fidelity:
    """Fidelity of choosing among candidates by `validation` (values paired with `test`, same order).

    `selected` is the index the selection actually chose (ties may have been broken by other metrics);
    default: the first maximum of `validation`.
    """
    val, tst = np.asarray(validation, dtype=float), np.asarray(test, dtype=float)
    if val.shape != tst.shape or val.ndim != 1 or val.size == 0:
        raise ValueError(f"validation {val.shape} and test {tst.shape} must be two non-empty sequences of one length")
    if not (np.isfinite(val).all() and np.isfinite(tst).all()):
        raise ValueError("validation and test values must be finite")
    chosen = int(np.argmax(val)) if selected is None else selected
    if not 0 <= chosen < val.size:
        raise ValueError(f"selected={selected} is not an index of the {val.size} candidates")
    rho = math.nan
    if val.size >= 3 and np.ptp(val) > 0 and np.ptp(tst) > 0:
        rho = float(spearmanr(val, tst).statistic)
    return Fidelity(rho, float(tst.max() - tst[chosen]), int(val.size))


def split_half_reliability(labels: Sequence[int], scores: Sequence[Sequence[float]], splits: int = 50,
                           seed: int = 0) -> float:
    """Mean Spearman correlation, over `splits` random label-stratified halvings of the test images, between the
    candidates' image AUROCs on one half and on the other. `scores`: one row of per-image test scores per
    candidate; `labels`: 0 normal, 1 defective. NaN with fewer than 3 candidates or 2 images of a class."""
    y, rows = np.asarray(labels), np.asarray(scores, dtype=float)
    if rows.ndim != 2 or rows.shape[1] != y.size:
        raise ValueError(f"scores {rows.shape} must hold one row of {y.size} per-image scores per candidate")
    classes = [np.flatnonzero(y == c) for c in (0, 1)]
    if rows.shape[0] < 3 or min(len(c) for c in classes) < 4:
        return math.nan
    rng = np.random.default_rng(seed)
    correlations = []
    for _ in range(splits):
        first = np.zeros(y.size, dtype=bool)
        for members in classes:
            first[rng.permutation(members)[:len(members) // 2]] = True
        halves = [[image_auroc(y[half], row[half]) for row in rows] for half in (first, ~first)]
        if np.ptp(halves[0]) > 0 and np.ptp(halves[1]) > 0:
            correlations.append(spearmanr(*halves).statistic)
    return float(np.mean(correlations)) if correlations else math.nan


def reliability_words(value: float) -> str:
    """How to read a test split-half reliability."""
    if value <= 0:
        return "the test set cannot rank these candidates: its order is noise"
    if value < 0.5:
        return "weak: Spearman against this test set is mostly noise"
    return "the test set ranks these candidates"


def fidelity_line(figures: Optional[Fidelity], over: str) -> str:
    """How far the selection can be trusted, in words and numbers, for the terminal."""
    if figures is None:
        return "selection fidelity: n/a (no validation score: no held-out normals)"
    rho = "n/a (fewer than 3 points or a constant score)" if math.isnan(figures.spearman) else f"{figures.spearman:+.2f}"
    line = (f"selection fidelity over {figures.points} {over}: Spearman(val, test image AUROC) {rho}; "
            f"optimism {figures.optimism:.4f} (test AUROC of the test-best minus the chosen)")
    if not math.isnan(figures.test_reliability):
        reliability = figures.test_reliability
        line += f"; test split-half reliability {reliability:+.2f} ({reliability_words(reliability)})"
    return line


__all__ = ["Fidelity", "fidelity", "split_half_reliability", "reliability_words", "fidelity_line", "SPEARMAN_KEY",
           "OPTIMISM_KEY", "POINTS_KEY", "RELIABILITY_KEY"]
