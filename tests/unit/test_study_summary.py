"""The sweep summary counts complete trials once: the state counts and the fidelity line say the same number."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from fastflow.engine.protocol import PAPER
from fastflow.pages.study_page import trial_rows
from fastflow.study.summary import SweepResult, best_trial, state_counts, summary_table, trial_fidelity


def test_the_fidelity_line_counts_against_every_complete_trial(stores) -> None:
    """Failed before the fix: "complete 4" then "selection fidelity over 3 complete trials" (a complete trial
    without a validation score, e.g. one that held out no normals, is in the first count and not the second)."""
    study = optuna.create_study(direction="maximize")
    scored = [{"image_auroc": a, "val_image_auroc": v} for a, v in ((0.7, 0.6), (0.8, 0.9), (0.75, 0.7))]
    for i, attrs in enumerate([*scored, {"image_auroc": 0.72}]):
        study.add_trial(create_trial(value=attrs["image_auroc"], params={"x": i / 10},
                                     distributions={"x": FloatDistribution(0, 1)},
                                     user_attrs={**attrs, "mlflow_run_id": f"{i:032x}"}))
    trials = study.trials
    result = SweepResult("s", "p", best_trial(trials, PAPER), state_counts(trials), fidelity=trial_fidelity(trials, PAPER),
                         rows=trial_rows(trials, {}, PAPER))
    text = summary_table(result, "synthetic", PAPER.metric)
    assert text.splitlines()[0] == "study s: complete 4"
    assert "selection fidelity over 3 of the 4 complete trials (those with validation and test scores)" in text
