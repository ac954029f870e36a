"""Selection fidelity: can a choice made on the validation score be trusted on the test set? (maths only)

Over the candidates one selection chose among (the evaluated epochs of a run, the complete trials of a study):
- `spearman`: Spearman rank correlation between the validation and the test image AUROC; near 1, the
  validation score orders candidates as the test set does; near 0 or below, it orders them by chance or worse.
- `optimism`: test AUROC of the best candidate by test minus that of the candidate the selection chose;
  0 when the choice is also the test set's best. Choosing on the test set instead would report this much more
  than a user will see on new parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

SPEARMAN_KEY = "fidelity/spearman"
OPTIMISM_KEY = "fidelity/optimism"
POINTS_KEY = "fidelity/points"


@dataclass(frozen=True)
class Fidelity:
    spearman: float  # NaN when undefined (fewer than 3 points, or a constant sequence)
    optimism: float
    points: int

    def metrics(self) -> dict[str, float]:
        """Finite figures under their metric keys (NaN is left out: it cannot be logged)."""
        values = {SPEARMAN_KEY: self.spearman, OPTIMISM_KEY: self.optimism, POINTS_KEY: float(self.points)}
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


__all__ = ["Fidelity", "fidelity", "SPEARMAN_KEY", "OPTIMISM_KEY", "POINTS_KEY"]
