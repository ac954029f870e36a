"""The sweep runner end to end: real Optuna (sqlite RDB storage) and real MLflow (sqlite store)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sklearn.metrics import roc_auc_score

from fastflow import cli
from fastflow.core.metrics import interval_keys
from fastflow.engine.protocol import LEAK_FREE, PAPER, RANKED_METRICS
from fastflow.engine.selection import split_half_reliability
from fastflow.runtime.config import ConfigError
from fastflow.study.space import load_space
from fastflow.study.storage import SweepSettings, objective_name
from fastflow.study.summary import summary_table, trial_rank
from fastflow.study.sweep import run_sweep
from fastflow.tracking.registry import CHAMPION, model_name, promote

from conftest import REPO, write_space

def settings_for(tmp_path: Path, space: Path, synthetic_root: Path, **kwargs) -> SweepSettings:
    defaults = dict(space_path=space, category="synthetic", root=str(synthetic_root), trials=4, workers=1,
                    experiment="sweep-tests")
    return SweepSettings(**{**defaults, **kwargs})


def wait_for_running_trial(study_name: str, storage: str, seconds: float = 240):
    """Poll the study (another process runs it) until a trial is RUNNING with its MLflow run attached."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(1)
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).trials
        except KeyError:  # the study does not exist yet
            continue
        running = next((t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs), None)
        if running is not None:
            return running
    raise AssertionError(f"no trial of {study_name} started within {seconds} s")


def child_runs(parent_run_id: str, experiment: str = "sweep-tests"):
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.slow  # ~60 s: two spawned workers; the other sweep tests of this file run by default
def test_two_worker_sweep_logs_nested_runs_and_promotes(stores, synthetic_root):
    tmp = stores["tmp"]
    settings = settings_for(tmp, write_space(tmp), synthetic_root, workers=2)
    result = run_sweep(settings)

    study = optuna.load_study(study_name=result.study_name, storage=os.environ["OPTUNA_STORAGE"])
    states = [t.state for t in study.trials]
    assert len(states) == 4
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) > 1  # workers do not replay each other

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["study"] == result.study_name and parent.data.tags["category"] == "synthetic"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "study")}
    assert "study/optimization_history.png" in artifacts

    children = child_runs(result.parent_run_id)
    assert len(children) == 4
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert run_ids == {r.info.run_id for r in children}
    for run in children:
        trial = study.trials[int(run.data.tags["trial_number"])]
        history = client.get_metric_history(run.info.run_id, "eval/image_auroc")
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert [m.step for m in history] == [1, 2]
            assert run.data.params["model.flow_steps"] == str(trial.params["model.flow_steps"])
            assert run.info.run_name == f"trial-{trial.number:03d}"
        else:
            assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
            assert run.info.run_name == f"trial-{trial.number:03d}-pruned"  # visible in the runs table
    assert study.metric_names == [objective_name(LEAK_FREE)]  # optuna-dashboard's objective name (default: leak-free)
    assert study.metric_names == ["val_image_auroc (leak-free (held-out normals + synthetic anomalies))"]

    # the study page on the parent run: every trial, best first by the protocol's rule, linked to its run
    page = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/study.html")
    rows = page.split("<table>")[1].split("</table>")[0]
    order = [int(n) for n in re.findall(r"<td class=\"l\">#(\d+)", rows)]
    assert order[0] == result.best_trial.number and sorted(order) == [t.number for t in study.trials]
    complete = [t.number for t in sorted(study.trials, key=lambda t: tuple(-v for v in trial_rank(t, PAPER)))
                if t.state == TrialState.COMPLETE]
    assert order[:len(complete)] == complete
    for run in children:  # run names and plain run ids (no link can open inside MLflow's sandboxed viewer)
        assert f'data-run="{run.info.run_id}"' in rows and run.info.run_name in rows
        assert f'<code class="id">{run.info.run_id}</code>' in rows
    assert "href=" not in rows  # links only where the page is opened outside the viewer with a known server
    assert rows.count(">pruned") == sum(t.state == TrialState.PRUNED for t in study.trials)
    assert "leak-free image AUROC" in rows and "test image AUROC" in rows and "model.flow_steps" in rows
    assert page.count("data:image/png;base64,") >= 2  # the champion's heatmaps and the study figures, inlined

    champion = client.get_model_version_by_alias(model_name("synthetic"), CHAMPION)
    best = result.best_trial
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    # descriptions on the registered model and the version: data, protocol, threshold and its source, metrics
    best_run = client.get_run(champion.run_id)
    assert "models:/fastflow-synthetic@champion" in client.get_registered_model(model_name("synthetic")).description
    description = champion.description
    for expected in (best_run.data.tags["data_hash"], LEAK_FREE.label, "leak-free: quantile 0.99 of held-out normal scores",
                     best_run.data.tags["threshold"], f"{best_run.data.metrics['best/image_auroc']:.4f}",
                     f"trial {best.number}"):
        assert expected in description, expected
    loaded = mlflow.pyfunc.load_model(f"models:/{model_name('synthetic')}@{CHAMPION}")
    import numpy as np
    output = loaded.predict(np.zeros((1, 50, 70, 3), np.uint8))
    assert output["scores"].shape == (1,) and output["anomaly_maps"].shape == (1, 64, 64)
    summary = summary_table(result, "synthetic", settings.metric)
    assert settings.objective == "val" and "selection: leak-free" in summary and "image_auroc" in summary
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for trial in study.trials:  # the pruner saw the running best of what the objective returns
        reported = [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
        assert reported == sorted(reported)
        if trial.state == TrialState.COMPLETE:
            assert reported[-1] == trial.value == trial.user_attrs["val_image_auroc"]
    assert parent.data.tags["selection_protocol"] == LEAK_FREE.label
    parent_metrics = client.get_run(result.parent_run_id).data.metrics
    assert parent_metrics["fidelity/points"] == len(complete) == result.fidelity.points
    best_test = max(t.user_attrs["image_auroc"] for t in complete)
    assert parent_metrics["fidelity/optimism"] == pytest.approx(best_test - best.user_attrs["image_auroc"])
    assert f"selection fidelity over {len(complete)} complete trials" in summary
    # each trial's per-image test scores at its best epoch, and the study's test reliability computed from them
    scores = [json.loads(mlflow.artifacts.load_text(f"runs:/{t.user_attrs['mlflow_run_id']}/test_scores.json"))
              for t in complete]
    assert all(s["images"] == scores[0]["images"] and len(s["scores"]) == len(s["labels"]) for s in scores)
    assert all(roc_auc_score(s["labels"], s["scores"]) == pytest.approx(t.user_attrs["image_auroc"])
               for s, t in zip(scores, complete))
    expected = split_half_reliability(scores[0]["labels"], [s["scores"] for s in scores])
    assert ("fidelity/test_reliability" in parent_metrics) == math.isfinite(expected)
    assert parent_metrics.get("fidelity/test_reliability", 0.0) == pytest.approx(0.0 if math.isnan(expected) else expected)
    # version tags: only what @champion is ranked by (the description says the rest)
    assert set(champion.tags) == {"metric", *(f"best/{k}" for k in RANKED_METRICS)}
    assert "validation/good" in description  # where the held-out normals came from
    check_descriptions(client, result, study, order, champion)
    for run in [parent, *children]:  # the runs table's Source and Version columns
        check_source_tags(run.data.tags)
    best_metrics = client.get_run(champion.run_id).data.metrics
    for name in ("image_auroc", "pixel_auroc", "val_image_auroc"):  # the terminal summary's AUROCs: with intervals
        value, bounds = interval(best_metrics, name).split(" ", 1)
        assert re.search(rf"{name} +{re.escape(value)} +{re.escape(bounds)}", summary), summary
    params = parent.data.params  # the search space and the study's settings
    assert params["space.model.flow_steps"] == "int 2..4 step 2" and params["space.preset"] == "one of efficientnet_lite0"
    assert params["space.train.lr"] == "float 0.0005..0.002 log" and params["fixed.train.epochs"] == "2"
    assert params["study.objective"] == f"maximize val_image_auroc ({LEAK_FREE.label})"
    assert params["study.pruner"] == "median" and params["study.name"] == result.study_name

    # re-running the same command resumes the study: more trials, same parent run
    again = run_sweep(SweepSettings(**{**settings.__dict__, "trials": 1, "workers": 1}))
    assert len(optuna.load_study(study_name=result.study_name, storage=os.environ["OPTUNA_STORAGE"]).trials) == 5
    assert again.parent_run_id == result.parent_run_id
    assert len(child_runs(result.parent_run_id)) == 5


@pytest.mark.slow  # `make test` keeps test_safety's diverging-lr line and test_faults' closed trials
def interval(metrics: dict, name: str) -> str:
    """`0.812 [0.700, 0.900]`: how the descriptions and the summary print an AUROC with its interval."""
    low, high = (metrics[f"best/{key}"] for key in interval_keys(name))
    return f"{metrics[f'best/{name}']:.3f} [{low:.3f}, {high:.3f}]"


LINK = r"\[([^\]]+)\]\(#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning\)"


def check_descriptions(client: MlflowClient, result, study, order: list[int], champion) -> None:
    """The parent run's description ranks every trial with a working link to its run and names the champion and
    how to load it; each trial's description gives its rank, objective with interval, state and best epoch."""
    parent = client.get_run(result.parent_run_id)
    note = parent.data.tags["mlflow.note.content"]
    assert len(note) < 8000  # MLflow truncates tag values at 8000 characters
    links = re.findall(LINK, note)
    best_link, table = links[0], links[1:]  # the first line names the best trial; then the ranked table
    assert best_link[2] == champion.run_id
    for name, experiment_id, run_id in links:  # each link's run exists, in that experiment, under that name
        run = client.get_run(run_id)
        assert (run.info.run_name, run.info.experiment_id) == (name, experiment_id)
    assert [int(client.get_run(run_id).data.tags["trial_number"]) for _, _, run_id in table] == order
    assert f"#/models/{model_name('synthetic')}/versions/{champion.version}" in note
    assert f"(#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts/study.html?" in note
    assert f'mlflow.pyfunc.load_model("models:/{model_name("synthetic")}@champion")' in note
    assert note.index(interval(client.get_run(champion.run_id).data.metrics, "val_image_auroc")) < note.index("| rank |")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    parent_link = f"(#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning)"
    for place, number in enumerate(order, start=1):
        trial = study.trials[number]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        text = run.data.tags["mlflow.note.content"]
        assert parent_link in text
        if trial.state == TrialState.COMPLETE:
            metrics = run.data.metrics
            assert f"**Rank {place} of {len(complete)}**" in text
            assert f"objective `val_image_auroc`: **{interval(metrics, 'val_image_auroc')}**" in text
            assert f"best epoch {int(metrics['best/epoch'])}" in text and interval(metrics, "image_auroc") in text
        else:
            assert text.startswith(f"**pruned at epoch {run.data.tags['pruned_at_epoch']}**") and "not ranked" in text


def check_source_tags(tags: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert tags["mlflow.source.type"] == "LOCAL"
    if commit:  # a git checkout: the commit names the code that produced the run
        assert tags["mlflow.source.git.commit"] == tags["git_commit"] == commit
        assert f"@ {commit[:7]}" in tags["mlflow.source.name"]


def test_diverging_trial_fails_and_study_continues(stores, synthetic_root):
    tmp = stores["tmp"]
    settings = settings_for(tmp, write_space(tmp, epochs=1), synthetic_root, trials=2)
    # the space bounds lr, so the diverging value comes in as a forced override of the trial
    diverging = SweepSettings(**{**settings.__dict__, "trials": 1, "extra_fixed": {"train.lr": 1.0e30}})
    run_sweep(diverging)
    result = run_sweep(settings)
    trials = optuna.load_study(study_name=result.study_name, storage=os.environ["OPTUNA_STORAGE"]).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    failed_run = MlflowClient().get_run(trials[0].user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "NonFiniteLossError" in failed_run.data.tags["error"]


@pytest.mark.slow  # the heartbeat path; `make test` keeps test_faults' SIGKILLed sweep closed at once on re-run
def test_killed_worker_trial_fails_and_is_retried(stores, synthetic_root):
    tmp = stores["tmp"]
    space = write_space(tmp, epochs=50)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from fastflow.sweep import SweepSettings, run_sweep
        run_sweep(SweepSettings(Path({str(space)!r}), "synthetic", {str(synthetic_root)!r}, trials=1,
                                experiment="sweep-tests", heartbeat=1, grace=3))
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(), cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = os.environ["OPTUNA_STORAGE"]
    running = wait_for_running_trial("fastflow-synthetic-tiny", storage)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(4)  # past the grace period: the heartbeat is stale

    settings = settings_for(tmp, write_space(tmp, epochs=1), synthetic_root, trials=1, heartbeat=1, grace=3)
    run_sweep(settings)
    trials = optuna.load_study(study_name="fastflow-synthetic-tiny", storage=storage).trials
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert trials[0].state == TrialState.FAIL
    assert MlflowClient().get_run(running.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    retried = trials[1]
    assert retried.state == TrialState.COMPLETE and retried.params == trials[0].params


def test_objective_is_part_of_the_study(stores, synthetic_root, capsys):
    tmp = stores["tmp"]
    space = write_space(tmp)
    run_sweep(settings_for(tmp, space, synthetic_root, trials=0, objective="val"))
    with pytest.raises(ValueError, match="optimizes --objective val .*cannot be resumed with --objective test"):
        run_sweep(settings_for(tmp, space, synthetic_root, trials=0, objective="test"))
    command = ["sweep", "--space", str(space), "--root", str(synthetic_root), "--trials", "0", "--objective", "test"]
    assert cli.main(command) == 2
    assert "--study <new name>" in capsys.readouterr().err
    other = run_sweep(settings_for(tmp, space, synthetic_root, trials=0, objective="test", study_name="paper-protocol"))
    study = optuna.load_study(study_name=other.study_name, storage=os.environ["OPTUNA_STORAGE"])
    assert study.user_attrs["objective"] == "test"
    # a study from before the objective was stored: inferred from its trials (the old default was test)
    old = optuna.create_study(study_name="old-study", storage=os.environ["OPTUNA_STORAGE"], direction="maximize")
    old.add_trial(optuna.trial.create_trial(value=0.7, user_attrs={"image_auroc": 0.7, "val_image_auroc": 0.9}))
    with pytest.raises(ValueError, match="'old-study' optimizes --objective test"):
        run_sweep(settings_for(tmp, space, synthetic_root, trials=0, objective="val", study_name="old-study"))


def test_promote_moves_champion_only_on_improvement(stores, synthetic_root):
    tmp = stores["tmp"]
    # the paper protocol, so that the sweep's own promotion registers the test-best run first (as v1)
    result = run_sweep(settings_for(tmp, write_space(tmp, epochs=1), synthetic_root, trials=2, objective="test"))
    client = MlflowClient()
    runs = sorted(child_runs(result.parent_run_id), key=lambda r: r.data.metrics["best/image_auroc"])
    worst, best = runs[0], runs[-1]
    first = promote("synthetic", experiment="sweep-tests", run_id=best.info.run_id)
    assert first.promoted
    second = promote("synthetic", experiment="sweep-tests", run_id=worst.info.run_id)
    champion = client.get_model_version_by_alias(model_name("synthetic"), CHAMPION)
    if worst.data.metrics["best/image_auroc"] < best.data.metrics["best/image_auroc"]:
        assert not second.promoted and champion.version == first.version
    forced = promote("synthetic", experiment="sweep-tests", run_id=worst.info.run_id, force=True)
    assert forced.promoted
    assert client.get_model_version_by_alias(model_name("synthetic"), CHAMPION).version == forced.version
    versions = client.search_model_versions(f"name = '{model_name('synthetic')}'")
    assert len(versions) == 2  # nothing deleted, nothing registered twice


@pytest.mark.parametrize("content, key", [
    ("params:\n  train.lr: {type: float, low: 1.0, high: 0.1}\n", "params.train.lr"),
    ("params:\n  train.lrr: {type: float, low: 0.1, high: 1.0}\n", "params.train.lrr"),
    ("params:\n  model.flow_steps: {type: int, low: 0, high: 4}\n", "params.model.flow_steps"),
    ("params:\n  model.anomaly_map: {type: categorical, choices: [z2, zz]}\n", "params.model.anomaly_map"),
    ("params:\n  train.lr: {type: gaussian}\n", "params.train.lr.type"),
    ("preset: {type: categorical, choices: [resnet19]}\n", "resnet19"),
    ("pruner: sometimes\n", "pruner"),
    ("trails: 3\n", "trails"),
])
def test_bad_space_file_names_the_key(tmp_path: Path, content: str, key: str):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_space(path)
    assert str(path) in str(error.value) and key in str(error.value)


def test_a_space_files_problems_are_all_in_one_message_and_presets_are_listed(tmp_path: Path):
    """Failed before the fix: one problem at a time, and `'resnet19' has no file ...` without the known presets."""
    path = tmp_path / "bad.yaml"
    path.write_text("preset: {type: categorical, choices: [resnet19]}\npruner: sometimes\n"
                    "params:\n  train.lr: {type: float, low: 1.0, high: 0.1}\n")
    with pytest.raises(ConfigError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 3 problems: (1) ") and "\n" not in message
    assert "params.train.lr" in message and "pruner='sometimes'" in message
    known = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
    assert f"'resnet19' has no file" in message and f"(known presets: {', '.join(known)})" in message


def test_shipped_spaces_load():
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        space = load_space(path)
        assert space.params, path


@pytest.mark.slow  # flaky: twice in ~6 full runs the sweep exited 0 after SIGINT (cause not found yet; see the
# issue-13 note); `make chaos` kills 1- and 2-worker sweeps with SIGINT and checks the same invariants
def test_ctrl_c_marks_trial_and_runs(stores, synthetic_root):
    """SIGINT to the process group (what Ctrl-C sends) ends the sweep cleanly with every state consistent."""
    tmp = stores["tmp"]
    space = write_space(tmp, epochs=50)
    command = [sys.executable, "-m", "fastflow.cli", "sweep", "--space", str(space), "--category", "synthetic",
               "--root", str(synthetic_root), "--trials", "1"]
    sweep = subprocess.Popen(command, env=os.environ.copy(), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    storage = os.environ["OPTUNA_STORAGE"]
    wait_for_running_trial("fastflow-synthetic-tiny", storage)
    time.sleep(2)
    os.killpg(sweep.pid, signal.SIGINT)
    code = sweep.wait(timeout=120)
    error = sweep.stderr.read().decode()
    assert code == 130 and "interrupted" in error, error[-2000:]

    trial = optuna.load_study(study_name="fastflow-synthetic-tiny", storage=storage).trials[0]
    assert trial.state == TrialState.FAIL
    client = MlflowClient()
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"


def _offline_sweep(stores: dict, *args: str) -> tuple[int, list[str], str, float]:
    """`fastflow sweep` from the project folder on a machine where no ImageNet weights are cached and the Hub is
    declared offline (empty HF/torch caches, HF_HUB_OFFLINE=1): (exit code, stdout lines, stderr, seconds until
    its first line of output)."""
    tmp = stores["tmp"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), "TORCH_HOME": str(tmp / "torch")}
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "fastflow.cli", "sweep", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    seconds = time.monotonic() - start
    rest, error = process.communicate(timeout=120)
    if not first:  # nothing on stdout: the answer is on stderr, and came when the process ended
        seconds = time.monotonic() - start
    return process.returncode, (first + rest).splitlines(), error, seconds


def _notice_limit(stores: dict) -> float:
    """Seconds allowed until the one-line answer: 30 (the issue's bound), or, on a machine so loaded that merely
    importing what the answer needs (torch, timm, the package) takes longer, that import time plus 20 s; a wait
    for the network (the bug: minutes per trial) exceeds both."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(stores["tmp"] / "hf")}
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fastflow.cli, fastflow.study.space"], cwd=REPO, env=env, check=True)
    return max(30.0, time.monotonic() - start + 20.0)


@pytest.mark.slow  # ~13 s; the offline named-space test beside it covers the same check in ~6 s
def test_offline_headline_sweep_falls_back_to_the_offline_space_in_one_line(stores, tiny_mvtec):
    """`make sweep CATEGORY=...` (no SPACE) offline: first a notice naming sweeps/offline.yaml (the issue asks for
    it within 30 s), no traceback, and the study is the offline space's."""
    code, out, error, seconds = _offline_sweep(stores, "--category", tiny_mvtec.name, "--root",
                                               str(tiny_mvtec.parent), "--trials", "0")
    assert code == 0, error[-2000:]
    assert out[0].startswith("note: ImageNet weights for") and "sweeping sweeps/offline.yaml instead" in out[0]
    assert "Traceback" not in "\n".join(out) + error
    assert seconds < _notice_limit(stores)
    assert optuna.get_all_study_names(os.environ["OPTUNA_STORAGE"]) == [f"fastflow-{tiny_mvtec.name}-offline"]


def test_offline_sweep_of_a_named_imagenet_space_stops_in_one_line_before_any_trial(stores, tiny_mvtec):
    code, out, error, seconds = _offline_sweep(stores, "--space", "sweeps/default.yaml", "--category",
                                               tiny_mvtec.name, "--root", str(tiny_mvtec.parent), "--trials", "3")
    assert code == 2 and out == []
    lines = error.strip().splitlines()
    assert len(lines) == 1 and "SPACE=sweeps/offline.yaml" in lines[0] and "sweeps/default.yaml" in lines[0], lines
    assert seconds < _notice_limit(stores)
    assert not (stores["tmp"] / "optuna.db").exists()  # no study, no run: nothing was started
