"""Multi-machine sweep: checks against the PostgreSQL Optuna storage and the `mlflow server` that
scripts/distributed_test.sh (`make test-distributed`) starts and fills from two `fastflow sweep` workers.

Skipped unless that script set FASTFLOW_DISTRIBUTED_STUDY (with OPTUNA_STORAGE and MLFLOW_TRACKING_URI).
`python tests/e2e/test_distributed.py` prints the study's run tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

STUDY = os.environ.get("FASTFLOW_DISTRIBUTED_STUDY", "")
pytestmark = pytest.mark.skipif(not STUDY, reason="needs the servers started by `make test-distributed`")

EXPERIMENT = "fastflow"
CATEGORY = "synthetic"
MACHINES = ("machine-a", "machine-b")


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return MlflowClient()


def _study():
    import optuna

    return optuna.load_study(study_name=STUDY, storage=os.environ["OPTUNA_STORAGE"])


def _parents_with_children():
    client = _client()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment_id], f"tags.study = '{STUDY}' and tags.role = 'study'")
    return [(parent, client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                        max_results=1000)) for parent in parents]


def _parent_and_children():
    tree = _parents_with_children()
    return [parent for parent, _ in tree], [child for _, children in tree for child in children]


def _machine(run) -> str:
    return Path(run.data.params["data.root"]).parent.name


@pytest.fixture(scope="module")
def study():
    return _study()


@pytest.fixture(scope="module")
def runs():
    return _parent_and_children()


def test_study_in_postgres_holds_every_trial(study):
    from optuna.trial import TrialState

    assert os.environ["OPTUNA_STORAGE"].startswith("postgresql")
    assert len(study.trials) == int(os.environ["FASTFLOW_DISTRIBUTED_TRIALS"])
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials), \
        [(t.number, t.state.name) for t in study.trials]
    assert any(t.state == TrialState.COMPLETE for t in study.trials)
    assert all("mlflow_run_id" in t.user_attrs for t in study.trials)
    distinct = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(distinct) == len(study.trials), "machines replayed each other's suggestions (same TPE seed)"


def test_one_parent_run_holds_every_trial_of_both_machines(study, runs):
    from optuna.trial import TrialState

    parents, children = runs
    assert len(parents) == 1, f"expected one parent run for {STUDY}, got {[p.info.run_id for p in parents]}"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert os.environ.get("FASTFLOW_DISTRIBUTED_PASSWORD", "unset") not in parent.data.tags["storage"]
    assert parent.data.tags["storage"].startswith("postgresql+psycopg2://fastflow:***@127.0.0.1")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert "study/optimization_history.png" in {a.path for a in _client().list_artifacts(parent.info.run_id, "study")}

    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    per_machine = {m: sum(_machine(r) == m for r in children) for m in MACHINES}
    assert per_machine == {m: len(children) // 2 for m in MACHINES}, per_machine
    for run in children:
        trial = study.trials[int(run.data.tags["trial_number"])]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            history = _client().get_metric_history(run.info.run_id, "eval/image_auroc")
            assert [m.step for m in history] == list(range(1, int(os.environ["FASTFLOW_DISTRIBUTED_EPOCHS"]) + 1))
        else:
            assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"


def test_artifacts_download_through_the_server(study, runs, tmp_path: Path):
    import mlflow
    import torch
    from optuna.trial import TrialState

    client = _client()
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    run_id = best.user_attrs["mlflow_run_id"]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "config.yaml", "history.json", "curves.png", "images"} <= top, top
    heatmaps = [a.path for a in client.list_artifacts(run_id, "images") if "heatmaps" in a.path]
    assert heatmaps, "no heatmap images"

    checkpoint = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/checkpoint.pt",
                                                     dst_path=str(tmp_path))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert isinstance(state, dict) and state
    heatmap = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=heatmaps[0],
                                                       dst_path=str(tmp_path)))
    assert heatmap.stat().st_size > 0

    # the files sit in the server's --artifacts-destination, and no worker fell back to a local store
    work = Path(os.environ["FASTFLOW_DISTRIBUTED_WORK"])
    assert list((work / "artifacts").rglob("checkpoint.pt"))
    for machine in MACHINES:
        assert not list((work / machine).rglob("*.db")), f"{machine} wrote a local store"
        assert not (work / machine / "mlruns").exists()


def test_champion_is_the_study_best_and_loads(study, runs):
    import mlflow
    import numpy as np
    from optuna.trial import TrialState

    from fastflow.tracking.registry import CHAMPION, model_name

    _, children = runs
    champion = _client().get_model_version_by_alias(model_name(CATEGORY), CHAMPION)
    assert champion.run_id in {r.info.run_id for r in children}
    best_value = max(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    assert float(champion.tags["best/image_auroc"]) == pytest.approx(best_value, abs=1e-6)
    model = mlflow.pyfunc.load_model(f"models:/{model_name(CATEGORY)}@{CHAMPION}")
    output = model.predict(np.zeros((2, 50, 70, 3), np.uint8))
    assert output["scores"].shape == (2,) and output["anomaly_maps"].shape == (2, 64, 64)


def print_tree() -> None:
    """Study counts, then parent run -> child runs (trial, machine, state, value, artifacts)."""
    study = _study()
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    print(f"optuna study {STUDY} (PostgreSQL): {len(study.trials)} trials {counts}")
    client = _client()
    for parent, children in _parents_with_children():
        figures = [a.path for a in client.list_artifacts(parent.info.run_id, "study")]
        print(f"parent run {parent.info.run_id} {parent.info.run_name} [{parent.info.status}] "
              f"best/image_auroc={parent.data.metrics.get('best/image_auroc')} figures={figures}")
        for run in sorted(children, key=lambda r: int(r.data.tags["trial_number"])):
            trial = study.trials[int(run.data.tags["trial_number"])]
            artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
            print(f"  └─ {run.info.run_name} {run.info.run_id} {_machine(run)} [{run.info.status}] "
                  f"trial {trial.state.name} value={trial.value} params={trial.params} artifacts={artifacts}")
    try:
        from fastflow.tracking.registry import CHAMPION, model_name

        champion = client.get_model_version_by_alias(model_name(CATEGORY), CHAMPION)
        print(f"registry: {model_name(CATEGORY)} v{champion.version} @{CHAMPION} <- run {champion.run_id}")
    except Exception as error:  # printed for the log; the tests assert it
        print(f"registry: no champion ({error})")


if __name__ == "__main__":
    print_tree()
