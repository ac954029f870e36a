"""`fastflow predict` end to end: train a tiny model (real MLflow in tmp sqlite), register it, score a mixed folder."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from fastflow import cli
from fastflow.engine.train import train_and_evaluate
from fastflow.serve.inference import Predictor
from fastflow.serve.predict import list_inputs, load_predictor, predict
from fastflow.tracking.registry import promote
from fastflow.tracking.runs import start_run

from conftest import TINY_RUN as TINY, fast_config, tracking_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """One 1-epoch run on the synthetic category, registered as fastflow-synthetic@champion; its checkpoint file."""
    tmp = tmp_path_factory.mktemp("predict")
    with tracking_store(tmp):
        cfg = fast_config(tmp, *TINY, f"train.cache_dir={tmp_path_factory.getbasetemp() / 'feature-cache'}",
                          data_root=synthetic_root)
        with start_run(cfg) as tracker:
            train_and_evaluate(cfg, tracker)
        promotion = promote("synthetic", experiment=cfg.tracking.experiment, run_id=tracker.run_id)
        checkpoint = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id,
                                                              artifact_path="checkpoint/checkpoint.pt", dst_path=str(tmp)))
        yield SimpleNamespace(tmp=tmp, run_id=tracker.run_id, promotion=promotion, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def mixed_folder(trained, synthetic_root: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Real synthetic pictures saved in other sizes/modes/formats, a nested folder, a text file and a broken PNG."""
    folder = trained.tmp / "inputs"
    (folder / "nested").mkdir(parents=True)
    test = synthetic_root / "synthetic" / "test"
    defect = Image.open(sorted((test / "spot").iterdir())[0]).convert("RGB")
    good = Image.open(sorted((test / "good").iterdir())[0]).convert("RGB")
    sizes = {}

    def save(image: Image.Image, name: str) -> None:
        image.save(folder / name)
        sizes[name] = image.size

    save(defect.resize((150, 100)).convert("RGBA"), "spot_rgba.png")
    save(good.resize((80, 80)).convert("L"), "good_gray.jpg")
    deep = Image.fromarray(np.asarray(defect.resize((70, 90)).convert("L"), dtype=np.uint16) * 257)
    assert deep.mode == "I;16"
    save(deep, "spot16.png")
    save(good, "nested/good.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder, sizes


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_registered_champion_on_mixed_folder(trained, mixed_folder, caplog) -> None:
    folder, sizes = mixed_folder
    out = trained.tmp / "out-champion"
    with caplog.at_level(logging.WARNING, logger="fastflow.serve.predict"):
        rows = predict("models:/fastflow-synthetic@champion", str(folder), out, batch_size=3)
    assert "notes.txt" in caplog.text and "broken.png" in caplog.text  # skipped with a warning

    by_name = {Path(row.image).relative_to(folder).as_posix(): row for row in rows}
    assert set(by_name) == set(sizes)
    table = _read_csv(out / "results.csv")
    assert [r["image"] for r in table] == [row.image for row in rows]
    summary = json.loads((out / "results.json").read_text())
    assert sorted(Path(p).name for p in summary["skipped"]) == ["broken.png", "notes.txt"]
    assert summary["threshold_kind"] == "val_quantile" and len(summary["images"]) == len(rows)  # leak-free default

    predictor = Predictor.from_file(trained.checkpoint)
    for name, row in by_name.items():
        assert (row.width, row.height) == sizes[name]
        overlay, mask = Image.open(out / row.overlay), Image.open(out / row.mask)
        assert overlay.size == sizes[name] and overlay.mode == "RGB"
        assert mask.size == sizes[name] and mask.mode == "L"
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, 255}
        assert row.anomalous_fraction == pytest.approx((pixels > 0).mean())
        # max scoring: flagged exactly when the mask has a pixel (every input is at least the 64-px model size)
        assert row.is_anomalous == bool(pixels.any())
        assert row.is_anomalous == (row.score > row.threshold)
        assert 0.0 <= row.normalized_score <= 1.0
        assert row.threshold == pytest.approx(predictor.thresholds["val_quantile"])
    csv_row = next(r for r in table if r["image"].endswith("spot_rgba.png"))
    assert float(csv_row["score"]) == pytest.approx(by_name["spot_rgba.png"].score, rel=1e-6)
    # the synthetic spot is scored above the good picture it was not made from
    assert by_name["spot_rgba.png"].score > by_name["nested/good.png"].score


def test_predict_from_checkpoint_and_run_id_agree(trained, mixed_folder) -> None:
    folder, _ = mixed_folder
    registered = predict("models:/fastflow-synthetic@champion", str(folder), trained.tmp / "out-a")
    from_file = predict(str(trained.checkpoint), str(folder), trained.tmp / "out-b", threshold="f1")
    from_run = predict(trained.run_id, str(folder / "*.png"), trained.tmp / "out-c")
    scores = {row.image: row.score for row in registered}
    for row in from_file:
        assert row.score == pytest.approx(scores[row.image], abs=1e-5)
        assert row.threshold_kind == "f1"
        assert row.is_anomalous == (row.score > row.threshold)
    assert {Path(row.image).name for row in from_run} == {"spot_rgba.png", "spot16.png"}  # the glob, broken.png skipped
    for row in from_run:
        assert row.score == pytest.approx(scores[row.image], abs=1e-5)


def test_unknown_model_lists_registered_models(trained) -> None:
    with pytest.raises(ValueError, match="registered models: fastflow-synthetic"):
        load_predictor("models:/fastflow-nothing@champion")
    with pytest.raises(ValueError, match="aliases: champion"):
        load_predictor("models:/fastflow-synthetic@staging")
    with pytest.raises(FileNotFoundError, match="models:/<name>@<alias>"):
        load_predictor(str(trained.tmp / "missing.pt"))
    with pytest.raises(ValueError, match="stored: f1, val_quantile"):
        predict(str(trained.checkpoint), str(trained.tmp / "inputs"), trained.tmp / "out-x", threshold="otsu")


def test_empty_or_missing_input_names_it(trained, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        list_inputs(str(empty))
    (empty / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images in input"):
        predict(str(trained.checkpoint), str(empty), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no images in input .*\*\.png"):
        list_inputs(str(tmp_path / "*.png"))


def test_cli_predict_prints_summary(trained, mixed_folder, capsys) -> None:
    folder, sizes = mixed_folder
    out = trained.tmp / "out-cli"
    code = cli.main(["predict", "--model", f"runs:/{trained.run_id}/model", "--input", str(folder / "nested"),
                     "--out", str(out), "--batch-size", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "1 images scored" in printed and "good.png" in printed
    assert len(_read_csv(out / "results.csv")) == 1
    assert cli.main(["predict", "--model", "models:/fastflow-nothing@champion", "--input", str(folder),
                     "--out", str(out)]) == 2
    assert "fastflow-synthetic" in capsys.readouterr().err
    assert MlflowClient().get_registered_model("fastflow-synthetic").aliases["champion"] == trained.promotion.version


STANDALONE = """
import importlib.util, sys
import numpy as np, mlflow
assert importlib.util.find_spec("fastflow") is None, "fastflow is importable here: the test proves nothing"
model = mlflow.pyfunc.load_model("models:/fastflow-synthetic@champion")
output = model.predict(np.zeros((2, 40, 50, 3), np.uint8))
print("outputs", sorted(output), output["anomaly_maps"].shape, "fastflow from", sys.modules["fastflow"].__file__)
"""


def test_registered_model_loads_where_the_project_is_not_installed(trained, tmp_path: Path) -> None:
    """The pyfunc carries the package (`code_paths`): it loads in a Python that cannot import `fastflow` —
    `-S` skips the venv's .pth files (the editable install), PYTHONPATH holds only site-packages, cwd elsewhere."""
    site_packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(site_packages), PYTHONNOUSERSITE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{trained.tmp / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-S", "-c", STANDALONE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outputs ['anomaly_maps', 'is_anomalous', 'normalized_scores', 'scores'] (2, 64, 64)" in done.stdout
    assert "/code/fastflow/__init__.py" in done.stdout  # the copy packed with the model


class _Payload:
    """Unpickling it creates `marker`: the stand-in for `os.system` in a tampered store."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


@pytest.fixture
def tampered_model(trained, tmp_path: Path):
    """The champion's logged model turned into a pickled pyfunc whose `python_model.pkl` runs code when
    unpickled (what `mlflow.pyfunc.load_model` does with it); restored afterwards. Yields the marker file."""
    import pickle

    import yaml

    client = MlflowClient()
    model_id = client.get_run(trained.run_id).data.tags["model_uri"].split("/")[-1]
    folder = _local_path(mlflow.get_logged_model(model_id).artifact_location)
    mlmodel = folder / "MLmodel"
    original = mlmodel.read_text()
    marker = tmp_path / "payload-ran"
    spec = yaml.safe_load(original)
    flavor = spec["flavors"]["python_function"]
    flavor.pop("model_code_path", None)
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    mlmodel.write_text(yaml.safe_dump(spec))
    try:
        yield marker
    finally:
        mlmodel.write_text(original)
        (folder / "python_model.pkl").unlink()


def test_a_tampered_model_in_the_store_never_runs_code(trained, tampered_model, mixed_folder, tmp_path, capsys):
    """Failed before the fix: predict/export went through mlflow.pyfunc.load_model, which unpickled the model."""
    folder, _ = mixed_folder
    marker = tampered_model
    for model in ("models:/fastflow-synthetic@champion", f"runs:/{trained.run_id}/model", trained.run_id):
        code = cli.main(["predict", "--model", model, "--input", str(folder / "nested"), "--out", str(tmp_path / "p")])
        assert code == 0 and not marker.exists(), capsys.readouterr().err
    code = cli.main(["export", "--model", "models:/fastflow-synthetic/1", "--format", "torchscript", "--no-check",
                     "--out", str(tmp_path / "model.pt")])
    assert code == 0 and not marker.exists()


def test_a_tampered_checkpoint_in_the_store_is_refused_naming_the_run(trained, mixed_folder, tmp_path, capsys):
    """The run's checkpoint artifact is what predict reads: as data, so a pickled payload is refused in one line."""
    folder, _ = mixed_folder
    path = _local_path(MlflowClient().get_run(trained.run_id).info.artifact_uri) / "checkpoint" / "checkpoint.pt"
    original = path.read_bytes()
    marker = tmp_path / "payload-ran"
    import torch

    torch.save({"config": _Payload(marker), "state_dict": {}}, path)
    try:
        code = cli.main(["predict", "--model", "models:/fastflow-synthetic@champion", "--input", str(folder / "nested"),
                         "--out", str(tmp_path / "p")])
    finally:
        path.write_bytes(original)
    error = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert len(error.strip().splitlines()) == 1 and trained.run_id in error and "never as code" in error


def test_checkpoint_whose_config_does_not_fit_its_weights_is_one_line(trained, mixed_folder, tmp_path, capsys):
    """Failed before the fix: 103 lines of torch's `size mismatch`, and the file was never named."""
    import torch

    folder, _ = mixed_folder
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    checkpoint["config"]["model"]["hidden_ratio"] = 0.5
    path = tmp_path / "mismatched.pt"
    torch.save(checkpoint, path)
    code = cli.main(["predict", "--model", str(path), "--input", str(folder / "nested"), "--out", str(tmp_path / "p")])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    assert str(path) in error and "do not fit its config" in error and "model.hidden_ratio=0.5" in error
    assert "differ in shape" in error
