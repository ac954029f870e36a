"""Fault injection on real processes: SIGTERM/SIGKILL at a random point of a tiny train and a tiny sweep, then
a re-run; the stores are checked through MLflow and Optuna (fastflow.invariants). More kills: `make chaos`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from fastflow.study.recovery import OWNER_ATTR
from fastflow.study.space import load_space
from fastflow.study.storage import SweepSettings
from fastflow.study.sweep import make_objective, run_sweep
from fastflow.tracking.invariants import check_all, check_runs_and_trials

from conftest import DEMO_YAML, write_space

STUDY = "fastflow-synthetic-tiny"


def _wait(predicate, seconds: float = 240, what: str = "condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {seconds} s")


def _running_trials(storage: str):
    try:
        trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    except KeyError:
        return []
    return [t for t in trials if t.state == TrialState.RUNNING and OWNER_ATTR in t.user_attrs
            and "mlflow_run_id" in t.user_attrs]


def _sweep_command(space: Path, root: Path, trials: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "fastflow.cli", "sweep", "--space", str(space), "--category", "synthetic",
            "--root", str(root), "--trials", str(trials), "--workers", str(workers)]


def _long_training(tmp: Path, synthetic_root: Path, stderr) -> subprocess.Popen:
    """`fastflow train` of 500 tiny epochs in experiment `faults`, store in `tmp`: a run to interrupt."""
    command = [sys.executable, "-m", "fastflow.cli", "train", "--config", str(DEMO_YAML)]
    for item in (f"data.root={synthetic_root}", f"train.cache_dir={tmp / 'cache'}", "tracking.experiment=faults",
                 "model.input_size=64", "train.epochs=500", "train.max_train_images=8", "eval.heatmap_images=0"):
        command += ["--set", item]
    return subprocess.Popen(command, env=os.environ.copy(), cwd=tmp, stdout=subprocess.DEVNULL, stderr=stderr)


def _latest_faults_run(client: MlflowClient, tmp: Path):
    """The newest run of experiment `faults`, or None before the store or the run exists."""
    experiment = client.get_experiment_by_name("faults") if (tmp / "mlflow.db").exists() else None
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return runs[0] if runs else None


def test_sigterm_ends_a_training_run_killed(stores, synthetic_root):
    tmp = stores["tmp"]
    train = _long_training(tmp, synthetic_root, stderr=subprocess.PIPE)
    client = MlflowClient()

    def running_run():
        run = _latest_faults_run(client, tmp)
        return run if run is not None and run.info.status == "RUNNING" else None

    run = _wait(running_run, what="running train")
    time.sleep(random.uniform(0.5, 3.0))
    train.send_signal(signal.SIGTERM)  # what timeout(1), batch schedulers and docker stop send
    code = train.wait(timeout=120)
    error = train.stderr.read().decode()
    assert code == 143 and "terminated (SIGTERM)" in error, error[-2000:]
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == "terminated (SIGTERM)"


def test_sigkilled_train_run_is_closed_by_the_next_command(stores, synthetic_root, capsys):
    """Failed before the fix: a SIGKILLed `fastflow train` left its run RUNNING forever (no owner recorded).
    The next command on this host (here `promote`) ends it FAILED with error=killed; what it logged stays."""
    from fastflow.cli import main

    tmp = stores["tmp"]
    train = _long_training(tmp, synthetic_root, stderr=subprocess.DEVNULL)
    client = MlflowClient()

    def epoch_logged():
        run = _latest_faults_run(client, tmp)
        return run if run is not None and "train/loss" in run.data.metrics else None

    run = _wait(epoch_logged, what="a logged epoch")
    train.send_signal(signal.SIGKILL)
    train.wait(timeout=60)
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nothing could close it
    assert main(["promote", "--category", "synthetic", "--objective", "test"]) == 2  # no finished run to promote
    capsys.readouterr()
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and closed.data.tags["error"] == "killed"
    assert closed.data.tags["owner"].split(":")[1] == str(train.pid)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][:len(logged)] == logged
    assert check_runs_and_trials(None) == []


@pytest.mark.slow  # ~17 s; test_sigkilled_train_run_is_closed_by_the_next_command covers closing by default
def test_sigkilled_sweep_is_closed_at_once_by_the_next_run(stores, synthetic_root):
    """SIGKILL leaves no chance to clean up; re-running within the heartbeat grace (30 s) closes the dead
    worker's trial and run at once, and the parent run ends FINISHED with nothing RUNNING."""
    tmp, storage = stores["tmp"], stores["storage"]
    sweep = subprocess.Popen(_sweep_command(write_space(tmp, epochs=50), synthetic_root, 1, 1), env=os.environ.copy(),
                             cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed = _wait(lambda: _running_trials(storage), what="running trial")[0]
    time.sleep(random.uniform(0.0, 2.0))
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    result = run_sweep(SweepSettings(write_space(tmp, epochs=1), "synthetic", str(synthetic_root), trials=1,
                                     experiment="fastflow", promote=True))
    assert check_all(storage) == []
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert trials[killed.number].state in (TrialState.FAIL, TrialState.COMPLETE)  # COMPLETE: its run had finished
    assert MlflowClient().get_run(result.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow  # two spawned workers (~35 s idle); `make chaos` kills workers many more times
def test_dead_worker_fails_the_sweep_naming_its_trial(stores, synthetic_root):
    """Two trials per worker: the surviving worker outlives the victim and closes its trial first (its own clean-up
    closes trials of dead workers). Failed before the fix: the sweep then said the victim died 'between trials'."""
    tmp, storage = stores["tmp"], stores["storage"]
    sweep = subprocess.Popen(_sweep_command(write_space(tmp, epochs=4), synthetic_root, 4, 2), env=os.environ.copy(),
                             cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    victim = _wait(lambda: _running_trials(storage), what="running trial")[0]
    os.kill(int(victim.user_attrs[OWNER_ATTR].split(":")[1]), signal.SIGKILL)
    assert sweep.wait(timeout=240) == 2
    error = sweep.stderr.read().decode()
    assert f"trial #{victim.number}" in error and "SIGKILL" in error
    assert check_runs_and_trials(storage) == []  # closed by the sweep itself, no re-run needed
    trial = optuna.load_study(study_name=STUDY, storage=storage).trials[victim.number]
    assert trial.state == TrialState.FAIL
    assert MlflowClient().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"


def test_a_trial_is_never_pruned_at_its_final_epoch(stores, synthetic_root):
    tmp, storage = stores["tmp"], stores["storage"]
    space_path = write_space(tmp, epochs=1)
    settings = SweepSettings(space_path, "synthetic", str(synthetic_root), trials=1, experiment="faults")
    pruner = optuna.pruners.ThresholdPruner(lower=1.5)  # every AUROC (<= 1) is below: prune whenever asked
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize", pruner=pruner)
    study.optimize(make_objective(settings, load_space(space_path), ""), n_trials=1)
    trial = study.trials[0]
    assert trial.intermediate_values  # the final epoch was reported...
    assert trial.state == TrialState.COMPLETE  # ...and the finished training kept
    assert MlflowClient().get_run(trial.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


class _DroppedSignal:
    """Sends SIGINT from a finalizer once fastflow's handler is installed: Python prints the handler's
    exception as "Exception ignored in ... __del__" and drops it, as it does for any finalizer the garbage
    collector happens to run when a real Ctrl-C arrives."""

    def __init__(self):
        self.cycle = self  # freed only by the cyclic garbage collector

    def __del__(self):
        if getattr(signal.getsignal(signal.SIGINT), "__module__", "") == "fastflow.runtime.signals":
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs here, inside the finalizer
                pass


@pytest.fixture
def python_signal_handlers():
    """Restores this process's handlers, and forgets the signal the test sent itself."""
    from fastflow.runtime import signals

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    signals.forget()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_dropped_signal_still_stops_training_killed(make_config, python_signal_handlers):
    """Failed before the fix: the interrupt raised inside a finalizer was lost and training ran to the end."""
    from fastflow.engine.train import train_and_evaluate
    from fastflow.runtime import signals
    from fastflow.tracking.runs import start_run

    cfg = make_config("train.epochs=4", "eval.heatmap_images=0")
    signals.install()

    def drop_a_signal(epoch, metrics):
        if epoch == 1:
            _DroppedSignal()
            import gc
            gc.collect()
            assert signals.received() == signal.SIGINT  # the handler ran, its exception was dropped

    with pytest.raises(signals.Interrupted):
        with start_run(cfg) as tracker:
            train_and_evaluate(cfg, tracker, drop_a_signal)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"
    epochs = MlflowClient(cfg.tracking.uri).get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in epochs] == [1]


def test_a_dropped_signal_between_trials_ends_the_sweep_130(stores, synthetic_root, python_signal_handlers,
                                                            capsys):
    """Failed before the fix: the sweep went on with the next trial and exited 0. Optuna's garbage collection
    after trial 0 (or any earlier explicit collection) runs the finalizer that drops the signal."""
    import gc

    from fastflow.cli import main

    tmp, storage = stores["tmp"], stores["storage"]
    space = write_space(tmp, epochs=1)
    gc.disable()  # so that the only collection is Optuna's, after the first trial
    try:
        _DroppedSignal()
        code = main(["sweep", "--space", str(space), "--category", "synthetic", "--root", str(synthetic_root),
                     "--trials", "2", "--no-promote"])
    finally:
        gc.enable()
    assert code == 130 and "interrupted" in capsys.readouterr().err
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert len(trials) == 1  # no second trial started (the first FAILs instead when a library collects earlier)
    assert check_runs_and_trials(storage) == []


def test_a_sampled_config_that_fails_validation_gets_one_failed_run(stores, synthetic_root):
    """Failed before the fix: the trial FAILed with no MLflow run, so the failure was invisible in the UI."""
    tmp, storage = stores["tmp"], stores["storage"]
    space = write_space(tmp, epochs=1)
    text = space.read_text().replace("  train.epochs: 1\n", "")  # each value is valid, the two together are not:
    space.write_text(text.replace("model.anomaly_map: {type: categorical, choices: [z2, nll]}",  # warm-up >= epochs
                                  "train.epochs: {type: categorical, choices: [1]}\n"
                                  "  train.warmup_epochs: {type: categorical, choices: [1]}"))
    run_sweep(SweepSettings(space, "synthetic", str(synthetic_root), trials=1, experiment="faults", promote=False))
    trial = optuna.load_study(study_name=STUDY, storage=storage).trials[0]
    assert trial.state == TrialState.FAIL
    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "train.warmup_epochs" in run.data.tags["error"]
    assert check_runs_and_trials(storage) == []
