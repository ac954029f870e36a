"""The kNN feature reference of a run (fastflow.engine.reference), on real pixels: logged once per run under
`reference/`, computed once per pair of feature-cache entries, and runnable alone (`fastflow reference`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import fast_config, mlflow_store, restored_tracking_uri
from fastflow import cli
from fastflow.engine.reference import CACHE_FOLDER, PREFIX
from fastflow.engine.encode import reference_of
from fastflow.engine.train import train_and_evaluate
from fastflow.tracking.runs import start_run

SETTINGS = ("model.input_size=128", "train.epochs=1", "train.max_train_images=0", "eval.heatmap_images=0")


def _tracked(cfg) -> tuple[dict, str]:
    with restored_tracking_uri(), start_run(cfg) as tracker:
        result = train_and_evaluate(cfg, tracker)
    return result.reference, tracker.run_id


def _stored(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / CACHE_FOLDER).glob("*.json"))


def test_reference_is_logged_once_per_run_and_computed_once_per_cache_entry(tmp_path: Path,
                                                                           synthetic_root: Path) -> None:
    cfg = fast_config(tmp_path, *SETTINGS, data_root=synthetic_root)
    first, first_run = _tracked(cfg)
    [stored] = _stored(tmp_path)
    written = stored.stat().st_mtime_ns
    second, second_run = _tracked(cfg)
    assert _stored(tmp_path) == [stored] and stored.stat().st_mtime_ns == written  # read back, not recomputed
    assert second == first == json.loads(stored.read_text())["metrics"]
    client = MlflowClient(cfg.tracking.uri)
    for run_id in (first_run, second_run):
        history = client.get_metric_history(run_id, PREFIX + "image_auroc")
        assert [(m.step, m.value) for m in history] == [(0, first[PREFIX + "image_auroc"])]  # exactly once
        logged = client.get_run(run_id).data.metrics
        assert {k: v for k, v in logged.items() if k.startswith(PREFIX)} == pytest.approx(first)
    assert first[PREFIX + "image_auroc"] > 0.5  # the synthetic defects are found without any training
    for metric in ("image_auroc", "pixel_auroc"):
        assert 0.0 <= first[f"{PREFIX}{metric}_ci_low"] <= first[PREFIX + metric] <= first[f"{PREFIX}{metric}_ci_high"]
    assert 0.0 <= first[PREFIX + "aupro"] <= 1.0 and 0.0 <= first[PREFIX + "off_defect_image_auroc"] <= 1.0


def test_a_damaged_reference_entry_is_recomputed_and_replaced(tmp_path: Path, synthetic_root: Path) -> None:
    cfg = fast_config(tmp_path, *SETTINGS, data_root=synthetic_root)
    values = reference_of(cfg)
    [stored] = _stored(tmp_path)
    figures = lambda found: {k: v for k, v in found.items() if k != PREFIX + "seconds"}  # (the time it took varies)
    damages = ('{"reference/image_auroc": 0.9}',  # the first format: metrics alone
               '{"metrics": {"reference/image_auroc": "high"}, "image_scores": [1.0]}',
               '{"metrics": {"reference/image_auroc": 0.9}, "image_scores": "none"}',
               '{"metrics": {"reference/image_auroc": 0.9}, "image_scores": [1.0], "pixel_counts": [[1], [2]]}',
               "{not json", "")
    for damage in damages:
        stored.write_text(damage)
        again = reference_of(cfg)
        assert figures(again) == figures(values)
        assert json.loads(stored.read_text())["metrics"] == again


def test_a_report_puts_an_interval_over_seeds_on_the_knn_row(tmp_path: Path, synthetic_root: Path) -> None:
    """Two seeds (two held-out splits of the training images: two memory banks) on the same test images: the report's
    kNN row is their mean with the bootstrap interval of that mean over test images, from each run's logged per-image
    kNN scores."""
    import shutil

    import numpy as np

    from fastflow.core.metrics import image_auroc_interval
    from fastflow.study.report import write_report

    root = tmp_path / "data"  # the synthetic parts without a validation/good folder: each seed holds out its own
    shutil.copytree(synthetic_root / "synthetic", root / "woven", ignore=shutil.ignore_patterns("validation"))
    runs = {seed: _tracked(fast_config(tmp_path, *SETTINGS, f"train.seed={seed}", "data.category=woven",
                                       "data.val_fraction=0.25", "tracking.experiment=knn-seeds", data_root=root))
            for seed in (0, 1)}
    client = MlflowClient(mlflow_store(tmp_path))
    with restored_tracking_uri():
        result = write_report("knn-seeds", tmp_path / "report", uri=mlflow_store(tmp_path), log_to_mlflow=False)
    (knn,) = result.reference_rows
    assert sorted(knn.run_ids) == sorted(run_id for _, run_id in runs.values())
    logged = [json.loads(Path(client.download_artifacts(run_id, "reference/test_scores.json", str(tmp_path))).read_text())
              for _, run_id in runs.values()]
    assert logged[0]["images"] == logged[1]["images"] and logged[0]["scores"] != logged[1]["scores"]  # two banks
    expected = image_auroc_interval(np.array(logged[0]["labels"]), np.array([s["scores"] for s in logged]))
    assert knn.intervals["image_auroc"] == pytest.approx(expected)
    low, high = knn.intervals["pixel_auroc"]
    assert low <= knn.ours["pixel_auroc"] <= high and high - low > 0
    markdown = (tmp_path / "report" / "paper_gap.md").read_text()
    assert (f"(kNN on the same features, measured here) | 2 | {knn.ours['image_auroc']:.3f} ± "
            f"{knn.spread['image_auroc']:.3f} [{expected[0]:.3f}, {expected[1]:.3f}] |") in markdown


def test_reference_alone_from_the_command_line(tmp_path: Path, synthetic_root: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    cfg = fast_config(tmp_path, *SETTINGS, data_root=synthetic_root)
    values = reference_of(cfg)
    sets = [f"train.cache_dir={cfg.train.cache_dir}", f"data.root={synthetic_root}", *SETTINGS]
    assert cli.main(["reference", "--config", "experiments/demo.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("kNN on the same features on synthetic (leak-free by construction")
    assert f"image AUROC {values[PREFIX + 'image_auroc']:.3f} [" in line
    assert f"pixel AUROC {values[PREFIX + 'pixel_auroc']:.3f} [" in line


@pytest.mark.parametrize("category, expected", [pytest.param("tire", "chw", marks=pytest.mark.slow),
                                                ("synthetic", "channel")])
def test_feature_norm_auto_reads_the_alignment_of_real_parts(tmp_path: Path, synthetic_root: Path, category: str,
                                                             expected: str) -> None:
    """Tire parts are aligned (the paper's (C,H,W) norm); the synthetic woven texture is the same everywhere (the
    per-position norm). The run tags the choice, and its checkpoint holds it, so a predictor rebuilds the same net."""
    import torch

    from conftest import TIRE_ROOT
    from fastflow.serve.inference import Predictor

    root = TIRE_ROOT if category == "tire" else synthetic_root
    if not (root / category).is_dir():
        pytest.skip(f"{category} not found under {root}")
    cfg = fast_config(tmp_path, "model.feature_norm=auto", "model.feature_pool=3", "model.feature_indices=[2,3]",
                      f"data.category={category}", "train.epochs=1", "eval.knn_reference=false", data_root=root)
    with restored_tracking_uri(), start_run(cfg) as tracker:
        result = train_and_evaluate(cfg, tracker)
    tags = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.tags
    assert tags["feature_norm"] == expected == result.checkpoint["config"]["model"]["feature_norm"]
    assert 0.0 <= float(tags["alignment"]) <= 1.0 and result.reference == {}
    predictor = Predictor(result.checkpoint)
    assert predictor(torch.rand(1, 3, 64, 64))[0].shape[0] == 1
