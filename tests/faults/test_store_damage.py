"""Damaged stores and first runs that race: real SQLite files damaged on disk, real racing processes on fresh stores.

A truncated, overwritten, empty or foreign file where the MLflow store or the Optuna storage should be is refused in
one line naming the store, what is wrong and what to do, and is left byte for byte as it was. Processes that open a
store that does not exist yet create its schema once and all go on.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from fastflow import cli
from fastflow.runtime.faults import StoreError, store_error

from conftest import REPO, mlflow_store, write_space


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _overwritten(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size // 3))


def _emptied(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
        connection.execute("INSERT INTO notes VALUES ('not a store')")


DAMAGE = {"truncated": (_truncated, "truncated ("), "random bytes": (_overwritten, "file is not a database"),
          "0 bytes": (_emptied, "empty (0 bytes)"), "foreign sqlite": (_foreign, "a SQLite database without the store's tables")}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _project_with_store(folder: Path) -> Path:
    """`<folder>/mlruns/mlflow.db`: a real MLflow store holding an experiment, as `fastflow train` leaves it."""
    (folder / "mlruns").mkdir(parents=True)
    MlflowClient(mlflow_store(folder / "mlruns")).create_experiment("fastflow")
    return folder / "mlruns" / "mlflow.db"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_mlflow_store_is_one_line_and_left_as_it_is(tmp_path: Path, damage: str, monkeypatch, capsys):
    """Failed before the fix: promote and report exited 1 with ~80 lines of SQLAlchemy traceback
    ('database disk image is malformed', 'file is not a database'), and a 0-byte or foreign file was silently
    given MLflow's schema."""
    store = _project_with_store(tmp_path)
    make_damage, what = DAMAGE[damage]
    make_damage(store)
    before = _digest(store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in (["promote", "--category", "synthetic"], ["report"]):
        assert cli.main(command) == 2
        printed = capsys.readouterr()
        lines = printed.err.strip().splitlines()
        assert len(lines) == 1 and not printed.out, printed.err
        assert lines[0].startswith(f"error: MLflow tracking store sqlite:///{store}: {what}"), lines[0]
        assert "MLFLOW_TRACKING_URI" in lines[0] and "backup" in lines[0]
        if damage in ("truncated", "random bytes"):
            assert f'sqlite3 {store} ".recover"' in lines[0]
        assert _digest(store) == before  # never overwritten, never given a schema
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("damage", ["truncated", "0 bytes"])
def test_a_damaged_optuna_storage_stops_the_sweep_in_one_line(stores, synthetic_root: Path, damage: str, capsys):
    """Failed before the fix: a traceback from SQLAlchemy (truncated), or a fresh schema written into the 0-byte
    file (the sweep went on)."""
    tmp = stores["tmp"]
    storage = tmp / "optuna.db"
    optuna.create_study(study_name="kept", storage=stores["storage"]).optimize(lambda t: t.suggest_float("x", 0, 1), 3)
    DAMAGE[damage][0](storage)
    before = _digest(storage)
    code = cli.main(["sweep", "--space", str(write_space(tmp)), "--trials", "1", "--root", str(synthetic_root)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: Optuna storage sqlite:///{storage}: {DAMAGE[damage][1]}"), lines[0]
    assert "OPTUNA_STORAGE" in lines[0]
    assert _digest(storage) == before
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert runs == []  # no parent run, no trial run


def test_damage_found_in_use_is_one_line_with_what_to_do(tmp_path: Path):
    """A store damaged under a running command: SQLAlchemy's error becomes one line with the recovery advice."""
    path = tmp_path / "optuna.db"
    _project_with_store(tmp_path)  # any real store file
    path.write_bytes((tmp_path / "mlruns" / "mlflow.db").read_bytes())
    _overwritten(path)
    uri = f"sqlite:///{path}"
    with pytest.raises(sqlalchemy.exc.DatabaseError) as raised:
        with sqlalchemy.create_engine(uri).connect() as connection:
            connection.execute(sqlalchemy.text("SELECT name FROM sqlite_master"))
    fault = store_error(raised.value, {"Optuna storage": uri})
    assert fault is not None and "\n" not in str(fault)
    assert str(fault).startswith(f"Optuna storage {uri}: damaged (") and ".recover" in str(fault)


def test_the_store_is_named_without_its_secret(tmp_path: Path):
    from fastflow.runtime.sqlite_store import open_sqlite

    path = tmp_path / "mlflow.db"
    path.write_bytes(b"")
    with pytest.raises(StoreError) as raised:
        open_sqlite(f"sqlite:///{path}?token=hunter2", "MLflow tracking store", "experiments", lambda: None)
    assert "hunter2" not in str(raised.value) and "token=***" in str(raised.value)
    assert path.read_bytes() == b""


@pytest.mark.slow  # two sweeps of two tiny trials each, started together (~60-90 s on a busy 2-core machine)
def test_two_first_sweeps_started_together_both_run_every_trial(tmp_path: Path, synthetic_root: Path):
    """Failed before the fix: one sweep exited 1 after ~100 lines of MLflow's schema setup and only 2 of the 4
    asked trials ran."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "fastflow.cli", "sweep", "--space", str(write_space(tmp_path)),
               "--trials", "2", "--root", str(synthetic_root)]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    study = optuna.load_study(study_name="fastflow-synthetic-tiny", storage=env["OPTUNA_STORAGE"])
    assert len(study.trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fastflow")
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId")]) == 4  # one run per trial
    assert len([r for r in runs if not r.data.tags.get("mlflow.parentRunId")]) == 1  # one parent run
    for output in outputs:  # each summary counts its complete trials once
        counted = int(output.split("complete ", 1)[1].split()[0].strip(","))
        assert f"over {counted} complete trials" in output or f"of the {counted} complete trials" in output, output
