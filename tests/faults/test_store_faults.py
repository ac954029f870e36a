"""Faults of the stores themselves, for real: a full disk and a read-only store (a tmpfs in a private mount
namespace, scripts/fault_env.py), an unreachable and a restarted tracking server (`mlflow server` on 127.0.0.1).
Each is one line naming the store and what to do, and loses nothing that was logged before."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fastflow import cli
from fastflow.engine.train import train_and_evaluate
from fastflow.tracking.invariants import check_runs_and_trials
from fastflow.tracking.runs import start_run

from conftest import DEMO_YAML, fast_config, mlflow_store
from fault_env import MlflowServer, free_port, run_on_small_disk, small_disk_available

needs_small_disk = pytest.mark.skipif(not small_disk_available(), reason="cannot mount a tmpfs (unshare) here")
TRAIN = ("model.input_size=64", "train.max_train_images=16", "eval.heatmap_images=2", "train.batch_size=8")


def _cli(*args: str) -> str:
    return " ".join([sys.executable, "-m", "fastflow.cli", *args])


def _train_command(store: Path, data: Path, cache: Path, *sets: str) -> str:
    items = (f"data.root={data}", f"train.cache_dir={cache}", f"tracking.uri=sqlite:///{store}/mlflow.db",
             "tracking.experiment=faults", *TRAIN, *sets)
    return _cli("train", "--config", str(DEMO_YAML), *[f"--set {item}" for item in items])


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _runs(store: Path) -> list:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])]


@pytest.mark.slow  # two CLI processes in a mount namespace (~40 s idle, ~110 s at load 8); `make chaos` fills disks too
@needs_small_disk
def test_disk_full_is_one_line_and_what_was_logged_is_kept(tmp_path: Path, synthetic_root: Path):
    """Failed before the fix: hundreds of lines with a dozen tracebacks, and the run stayed RUNNING forever
    (its FAILED update failed too). Now: one line naming the store; the run ends FAILED, by the failing command
    or by the next command on this host once there is space again; every epoch logged before is there."""
    store, out = tmp_path / "store", tmp_path / "after"
    store.mkdir()
    mlflow_store(store)  # an empty store (schema only): 0.9 MB of the 1.5 MB disk
    script = f"""{_train_command(store, synthetic_root, tmp_path / 'cache', 'train.epochs=3')} > {tmp_path}/train.log 2>&1
echo $? > {tmp_path}/train.code
mount -o remount,size=200m "$STORE"
cd {tmp_path} && MLFLOW_TRACKING_URI=sqlite:///$STORE/mlflow.db {_cli('promote', '--category', 'synthetic')} \\
  > {tmp_path}/promote.log 2>&1
"""
    done = run_on_small_disk(store, 1500, script, out, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode in (0, 2), done.stderr
    printed = (tmp_path / "train.log").read_text()
    assert (tmp_path / "train.code").read_text().strip() == "2", printed[-3000:]
    errors = _error_lines(printed)
    assert len(errors) == 1 and "Traceback" not in printed, printed[-3000:]
    assert "disk full" in errors[0] and f"{store}/mlflow.db" in errors[0] and "free space" in errors[0]
    [run] = _runs(out)
    assert run.info.status == "FAILED"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, len(steps) + 1))  # nothing lost, nothing out of order
    if "stays RUNNING" in errors[0]:  # the FAILED update failed too: the next command closed it
        assert run.data.tags["error"] == "killed"


@needs_small_disk
def test_read_only_store_is_one_line_and_unchanged(tmp_path: Path, synthetic_root: Path):
    """Failed before the fix: ~190 lines of SQLAlchemy tracebacks and no line naming the store."""
    store, out = tmp_path / "store", tmp_path / "after"
    store.mkdir()
    cfg = fast_config(store, *TRAIN, "train.epochs=1", "tracking.experiment=faults", data_root=synthetic_root,
                      preset=DEMO_YAML)
    with start_run(cfg) as tracker:
        train_and_evaluate(cfg, tracker)
    mlflow.set_tracking_uri(None)
    before = {(r.info.run_id, r.info.status) for r in _runs(store)}
    script = f"""{_train_command(store, synthetic_root, tmp_path / 'cache', 'train.epochs=1')} > {tmp_path}/train.log 2>&1
echo $? > {tmp_path}/train.code
cd {tmp_path} && MLFLOW_TRACKING_URI=sqlite:///$STORE/mlflow.db {_cli('promote', '--category', 'synthetic')} \\
  > {tmp_path}/promote.log 2>&1
echo $? > {tmp_path}/promote.code
"""
    done = run_on_small_disk(store, 200_000, script, out, read_only=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    for command in ("train", "promote"):
        printed = (tmp_path / f"{command}.log").read_text()
        assert (tmp_path / f"{command}.code").read_text().strip() == "2", printed[-3000:]
        assert printed.strip().splitlines() == _error_lines(printed), printed[-3000:]  # one line, nothing else
        assert "read-only" in printed and f"{store}/mlflow.db" in printed and "writable" in printed
    assert {(r.info.run_id, r.info.status) for r in _runs(out)} == before


def test_unreachable_tracking_server_is_one_line_at_once(tmp_path: Path, synthetic_root: Path, monkeypatch, capsys):
    """Failed before the fix: minutes of MLflow's retries, then a traceback."""
    uri = f"http://user:s3cret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    args = ["train", "--config", str(DEMO_YAML), "--set", f"data.root={synthetic_root}", "--set", "train.epochs=1",
            "--set", f"train.cache_dir={tmp_path / 'cache'}", *[x for item in TRAIN for x in ("--set", item)]]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert time.monotonic() - started < 60
    assert _error_lines(error) == error.strip().splitlines() and len(_error_lines(error)) == 1
    assert "unreachable" in error and uri.replace("s3cret", "***") in error and "s3cret" not in error


@pytest.mark.slow  # two starts of `mlflow server` (~15 s idle, ~40 s on a busy 2-core machine) and the outage
def test_tracking_server_restart_loses_no_epoch(tmp_path: Path, synthetic_root: Path):
    """The server stops after epoch 1 and comes back OUTAGE seconds later: training goes on (MLflow retries each
    call) and every epoch's metrics, the heatmaps and the model reach the server; the run ends FINISHED."""
    outage = 20
    with MlflowServer(tmp_path / "server") as server:
        cfg = fast_config(tmp_path, *TRAIN, "train.epochs=4", f"tracking.uri={server.uri}", data_root=synthetic_root)
        restarts = []

        def stop_after_epoch_one(epoch: int, metrics: dict) -> None:
            if epoch == 1:
                server.stop()
                restart = threading.Timer(outage, server.start)
                restart.start()
                restarts.append(restart)

        with start_run(cfg) as tracker:
            result = train_and_evaluate(cfg, tracker, stop_after_epoch_one)
        restarts[0].join()
        client = MlflowClient(server.uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "eval/image_auroc", "eval/val_image_auroc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
        assert run.data.metrics["best/epoch"] == result.best_epoch
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoint", "curves.png", "config.yaml"} <= names
        mlflow.set_tracking_uri(server.uri)
        assert check_runs_and_trials(None) == []
