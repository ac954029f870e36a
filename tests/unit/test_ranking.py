"""Ties at the objective are broken by the same protocol's next metrics, in the sweep and in promotion."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from fastflow.engine.protocol import LEAK_FREE, PAPER
from fastflow.study.summary import best_trial
from fastflow.tracking.logger import log_pyfunc_model
from fastflow.tracking.registry import CHAMPION, model_name, promote
from fastflow.tracking.store import ensure_experiment


def _study(rows: list[tuple[float, dict]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i, (value, attrs) in enumerate(rows):
        study.add_trial(create_trial(value=value, params={"x": float(i)}, distributions={"x": FloatDistribution(0, 9)},
                                     user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": 9.0}, distributions={"x": FloatDistribution(0, 9)},
                                 intermediate_values={1: 0.99}))
    return study


def test_best_trial_breaks_ties_with_the_same_protocols_metrics() -> None:
    paper = _study([
        (0.90, {"image_auroc": 0.90, "pixel_auroc": 0.80, "aupro": 0.9, "val_pixel_auroc": 0.99}),
        (0.90, {"image_auroc": 0.90, "pixel_auroc": 0.85, "aupro": 0.5}),
        (0.90, {"image_auroc": 0.90, "pixel_auroc": 0.85, "aupro": 0.6}),
        (0.89, {"image_auroc": 0.89, "pixel_auroc": 0.99, "aupro": 0.99}),
    ])
    assert best_trial(paper.trials, PAPER).number == 2  # objective tie -> pixel AUROC tie -> AUPRO
    leak_free = _study([
        (1.0, {"val_image_auroc": 1.0, "val_pixel_auroc": 0.90, "pixel_auroc": 0.99}),
        (1.0, {"val_image_auroc": 1.0, "val_pixel_auroc": 0.95, "pixel_auroc": 0.50}),
    ])
    assert best_trial(leak_free.trials, LEAK_FREE).number == 1  # the test-set pixel AUROC plays no part
    exact = _study([(0.9, {"pixel_auroc": 0.8}), (0.9, {"pixel_auroc": 0.8})])
    assert best_trial(exact.trials, PAPER).number == 0  # a full tie keeps the earlier trial


def test_promotion_breaks_ties_with_pixel_auroc(tmp_path: Path, stores: dict) -> None:
    client = MlflowClient()
    experiment_id = ensure_experiment("ranking", os.environ["MLFLOW_TRACKING_URI"])
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not loaded by promotion")

    def run(pixel_auroc: float) -> str:
        run_id = client.create_run(experiment_id, tags={"category": "tied"}).info.run_id
        for key, value in {"best/image_auroc": 0.9, "best/pixel_auroc": pixel_auroc, "best/aupro": 0.5}.items():
            client.log_metric(run_id, key, value)
        log_pyfunc_model(run_id, checkpoint, "tied")
        client.set_terminated(run_id)
        return run_id

    first, better, worse = run(0.80), run(0.85), run(0.70)
    assert promote("tied", experiment="ranking", run_id=first).promoted
    second = promote("tied", experiment="ranking", run_id=better)
    assert second.promoted  # same image AUROC, higher pixel AUROC
    assert not promote("tied", experiment="ranking", run_id=worse).promoted
    assert client.get_model_version_by_alias(model_name("tied"), CHAMPION).version == second.version
