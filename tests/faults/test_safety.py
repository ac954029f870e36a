"""Nothing lost, nothing stuck, nothing executed: promotion, checkpoints, secrets, cache integrity, early errors.

Each test reproduces one finding of issue 13 on real stores (sqlite MLflow, sqlite Optuna) and real pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fastflow import cli
from fastflow.data.features import EncodedSplit, FeatureCache
from fastflow.engine.protocol import PAPER, ranking_key
from fastflow.engine.train import train_and_evaluate
from fastflow.runtime.config import ConfigError, load_config
from fastflow.runtime.redact import redact
from fastflow.tracking.registry import CHAMPION, model_name, promote
from fastflow.tracking.runs import start_run

from conftest import DEMO_YAML, TINY_RUN, fast_config, mlflow_store, restored_tracking_uri, write_space

TINY = (*TINY_RUN, "eval.heatmap_images=0")


SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """A project folder whose default store (mlruns/mlflow.db) holds two finished runs of category synthetic:
    one from `fastflow train` given the store's URI with a password query parameter (its terminal output kept),
    one from the library."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "mlruns").mkdir()
    store = folder / "mlruns" / "mlflow.db"
    args = ["train", "--config", str(DEMO_YAML)]
    for item in (f"data.root={synthetic_root}", f"train.cache_dir={folder / 'cache'}", "tracking.experiment=fastflow",
                 f"tracking.uri=sqlite:///{store}?password={SECRET}", "model.input_size=64", *TINY):
        args += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    with restored_tracking_uri():
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(args) == 0
        cfg = fast_config(folder, *TINY, "train.seed=1", "train.lr=3e-4", "tracking.experiment=fastflow",
                          f"tracking.uri=sqlite:///{store}", data_root=synthetic_root)
        with start_run(cfg) as tracker:
            train_and_evaluate(cfg, tracker)
    run_ids = [r.info.run_id for r in MlflowClient(f"sqlite:///{store}").search_runs(
        [MlflowClient(f"sqlite:///{store}").get_experiment_by_name("fastflow").experiment_id])]
    return SimpleNamespace(folder=folder, run_ids=run_ids, printed=out.getvalue() + err.getvalue(),
                           uri=f"sqlite:///{store}?password={SECRET}")


def _fresh_process_state(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """As in a new shell in `folder`: no MLFLOW_TRACKING_URI, no tracking URI set in MLflow."""
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- 1. promote on its own


def test_cli_promote_alone_uses_the_project_store_and_is_idempotent(project, monkeypatch, capsys):
    folder, run_ids = project.folder, project.run_ids
    _fresh_process_state(monkeypatch, folder)
    assert cli.main(["promote", "--category", "synthetic"]) == 0
    assert cli.main(["promote", "--category", "synthetic"]) == 0
    assert "is now @champion" in capsys.readouterr().out
    assert not (folder / "mlflow.db").exists()  # no stray store in the working folder
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    versions = client.search_model_versions(f"name = '{model_name('synthetic')}'")
    assert len(versions) == 1 and versions[0].run_id in run_ids
    assert client.get_model_version_by_alias(model_name("synthetic"), CHAMPION).version == versions[0].version


def test_promote_from_another_folder_creates_no_store(tmp_path: Path, monkeypatch, capsys):
    """Failed before the fix: it created an empty <cwd>/mlruns/mlflow.db and then found no run in it."""
    _fresh_process_state(monkeypatch, tmp_path)
    assert cli.main(["promote", "--category", "synthetic"]) == 2
    error = capsys.readouterr().err
    assert "no MLflow store here" in error and "MLFLOW_TRACKING_URI" in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_twin_registrations_are_resolved_and_champion_is_best_by_ranking(project, monkeypatch):
    """A promoter killed between registering and resolving leaves a twin version; the next promotion removes it
    and points @champion at the best version by the protocol's ranking key."""
    folder, run_ids = project.folder, project.run_ids
    _fresh_process_state(monkeypatch, folder)
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    name = model_name("twins")
    runs = [client.get_run(run_id) for run_id in run_ids]
    for _ in range(2):  # two racing promoters both registered the first run
        mlflow.register_model(runs[0].data.tags["model_uri"], name, tags={
            "run_id": run_ids[0], "metric": "image_auroc",
            **{k: f"{v:.6f}" for k, v in runs[0].data.metrics.items() if k.startswith("best/")}})
    for run_id in run_ids:
        promote("twins", experiment="fastflow", run_id=run_id)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.run_id for v in versions) == sorted(run_ids)  # one version per run
    key = {v.version: ranking_key({k: float(x) for k, x in v.tags.items() if k.startswith("best/")}, PAPER, "best/")
           for v in versions}
    best = max(sorted(key, key=int), key=lambda v: key[v])  # ties: the earlier version
    assert client.get_model_version_by_alias(name, CHAMPION).version == best


def test_quote_in_category_is_a_clear_error(project, monkeypatch, capsys):
    folder = project.folder
    _fresh_process_state(monkeypatch, folder)
    assert cli.main(["promote", "--category", "o'ring"]) == 2
    assert "no finished run" in capsys.readouterr().err


# ---------------------------------------------------------------- 2. checkpoints are data, never code


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("command", ["predict", "export"])
def test_pickled_code_in_a_checkpoint_never_runs(tmp_path: Path, capsys, command: str):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"config": _Payload(marker), "state_dict": {}}, evil)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    args = {"predict": ["predict", "--model", str(evil), "--input", str(image), "--out", str(tmp_path / "out")],
            "export": ["export", "--model", str(evil), "--out", str(tmp_path / "x.onnx")]}[command]
    assert cli.main(args) == 2
    assert not marker.exists()
    error = capsys.readouterr().err
    assert str(evil) in error and "never as code" in error and "weights_only=False" not in error
    # torch's detail ends at its sentence's end (it was cut mid-sentence, into torch's advice to allowlist the global)
    assert re.search(r"\(Unsupported global: GLOBAL \S+ was not an allowed global by default\.\)", error), error


def test_corrupt_weights_file_is_one_clear_line(tmp_path: Path, capsys):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"PK\x03\x04 this is not a state dict" * 10)
    code = cli.main(["train", "--set", "model.weights=" + str(weights), "--set", "tracking.enabled=false",
                     "--set", f"data.root={tmp_path / 'data'}", "--set", "model.input_size=64"])
    error = capsys.readouterr().err
    assert code == 2 and str(weights) in error and "not a readable PyTorch file" in error
    assert "weights_only" not in error and "Traceback" not in error


# ---------------------------------------------------------------- 4. secrets


def test_tracking_uri_password_never_written_or_printed(project, tmp_path: Path):
    secret, uri = SECRET, project.uri
    assert "mlflow run:" in project.printed and secret not in project.printed
    client = MlflowClient(uri)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("fastflow").experiment_id])
               if "password" in r.data.params["tracking.uri"])
    assert run.data.params["tracking.uri"] == redact(uri) and secret not in redact(uri)
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v]
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"),
                                                         tracking_uri=uri))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "checkpoint.pt" for p in files)
    assert not [p for p in files if secret.encode() in p.read_bytes()]
    assert redact("postgresql://fastflow:pw1@db:5432/optuna") == "postgresql://fastflow:***@db:5432/optuna"
    assert redact("http://host/x?user=a&token=t0k&x=1") == "http://host/x?user=a&token=***&x=1"
    masked = "store sqlite:///m.db?password=***: disk full"  # masking twice keeps what follows a masked value
    assert redact(masked) == masked


def test_a_token_in_the_data_root_reaches_no_table_of_the_store(tmp_path: Path, synthetic_root: Path):
    """Failed before the fix: the datasets table (the UI's Dataset column) kept the data root's token."""
    from fastflow.tracking.invariants import check_secrets

    token = "tok3n-in-the-root"
    root = tmp_path / f"data?token={token}"
    root.mkdir()
    (root / "synthetic").symlink_to(synthetic_root / "synthetic")
    cfg = fast_config(tmp_path, *TINY, data_root=root)
    with start_run(cfg) as tracker:
        train_and_evaluate(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.inputs.dataset_inputs and "token=***" in run.inputs.dataset_inputs[0].dataset.source
    assert check_secrets([token], [tmp_path / "artifacts"], databases=[tmp_path / "mlflow.db"]) == []


def test_a_token_in_a_trial_error_reaches_no_store_or_log(tmp_path: Path, monkeypatch, caplog):
    """Failed before the fix: Optuna logged the failed trial's error text, data root and token included."""
    from fastflow.study.storage import SweepSettings
    from fastflow.study.sweep import run_sweep
    from fastflow.tracking.invariants import check_secrets

    token = "tok3n-in-an-error"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_sweep(SweepSettings(write_space(tmp_path, epochs=1), "widget", str(tmp_path / f"missing?token={token}"),
                            trials=1, storage=storage, promote=False))
    trial = optuna.load_study(study_name="fastflow-widget-tiny", storage=storage).trials[0]
    assert trial.state.name == "FAIL" and "failed" in caplog.text and "token=***" in caplog.text
    assert token not in caplog.text
    assert check_secrets([token], [tmp_path / "artifacts"], storage, [tmp_path / "mlflow.db", tmp_path / "optuna.db"]) == []


# ---------------------------------------------------------------- 5. feature cache integrity


def test_corrupt_cache_entry_is_detected_and_replaced(tmp_path: Path):
    cache = FeatureCache(tmp_path / "cache", 10**9)
    generator = torch.Generator().manual_seed(0)
    split = EncodedSplit([torch.rand(8, 16, 16, 16, generator=generator)], torch.zeros(8, 1, 64, 64, dtype=torch.bool),
                         torch.zeros(8, dtype=torch.long))
    cache.store("key", split)
    path = tmp_path / "cache" / "key" / "split.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)  # 4 KB of tensor data overwritten
    path.write_bytes(bytes(data))
    assert cache.load("key") is None  # never trusted
    cache.store("key", split)  # what encode_cached does after recomputing
    loaded = cache.load("key")
    assert loaded is not None and torch.equal(loaded.features[0], split.features[0])


# ---------------------------------------------------------------- 6. early, friendly errors


@pytest.mark.parametrize("override, expected", [
    ("model.input_size=100", "model.input_size=100 is invalid; expected a multiple of 16"),
    ("train.device=tpu", "train.device='tpu' is invalid; expected auto, cpu, cuda, cuda:N or mps"),
])
def test_config_errors_before_any_model_is_built(override: str, expected: str):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(None, ["model.backbone=resnet18", override])
    load_config(None, ["model.backbone=resnet18", "model.input_size=96", "train.device=cuda:1"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_config(None, ["model.backbone=deit_base_distilled_patch16_384", "model.feature_indices=[7]",
                           "model.input_size=200"])


def test_diverging_lr_with_one_step_per_epoch_is_one_line_naming_the_lr(tmp_path: Path, synthetic_root: Path, capsys):
    args = ["train", "--config", str(DEMO_YAML)]
    for item in (f"data.root={synthetic_root}", f"train.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
                 "model.input_size=64", "train.max_train_images=8", "train.batch_size=8", "train.epochs=2",
                 "train.lr=1e30", "eval.heatmap_images=0"):
        args += ["--set", item]
    assert cli.main(args) == 1
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in error
    assert "NaN or infinite after epoch 1" in lines[0] and "train.lr=1e+30 may be too high" in lines[0]
