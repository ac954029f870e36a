"""`fastflow report`: rows are the best FINISHED run per (category, backbone) in MLflow, compared with paper.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fastflow import cli
from fastflow.core.metrics import image_auroc, image_auroc_interval, pixel_auroc, pixel_counts
from fastflow.data.paper import CAIT_PER_CATEGORY
from fastflow.engine.protocol import LEAK_FREE, PAPER
from fastflow.study.report import write_report

from conftest import tracking_store

EXPERIMENT = "report-tests"

# (category, backbone, status, best/image_auroc, best/pixel_auroc, best/aupro)
RUNS = [
    ("bottle", "resnet18", "FINISHED", 0.90, 0.95, 0.80),
    ("bottle", "resnet18", "FINISHED", 0.97, 0.96, 0.85),  # the best bottle/resnet18 run
    ("bottle", "resnet18", "FAILED", 0.99, 0.99, 0.99),  # not finished: ignored
    ("bottle", "resnet18", "FINISHED", 0.97, 0.90, 0.70),  # ties on image AUROC, loses on pixel AUROC
    ("screw", "resnet18", "FINISHED", 0.60, 0.90, 0.55),
    ("bottle", "tf_efficientnet_lite0", "FINISHED", 0.88, 0.93, 0.75),
    ("tire", "resnet18", "FINISHED", 0.70, 0.75, 0.40),  # not in MVTec AD
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """The runs above in a tmp sqlite store, plus a study-style run without a backbone tag; -> best run ids."""
    tmp_path = tmp_path_factory.mktemp("report-store")
    with tracking_store(tmp_path):
        yield _fill(tmp_path)


def _fill(tmp_path: Path) -> dict[tuple[str, str], str]:
    client = MlflowClient()
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    best: dict[tuple[str, str], tuple[float, float, str]] = {}
    for category, backbone, status, image, pixel, aupro in RUNS:
        run = client.create_run(experiment_id, tags={"category": category, "backbone": backbone,
                                                     "selection_protocol": "test set (paper protocol)"})
        for key, value in (("image_auroc", image), ("pixel_auroc", pixel), ("aupro", aupro), ("epoch", 3)):
            client.log_metric(run.info.run_id, f"best/{key}", value)
        client.set_terminated(run.info.run_id, status)
        if status == "FINISHED" and (image, pixel) > best.get((category, backbone), (-1, -1, ""))[:2]:
            best[(category, backbone)] = (image, pixel, run.info.run_id)
    study = client.create_run(experiment_id, tags={"category": "bottle", "role": "study"})
    client.log_metric(study.info.run_id, "best/image_auroc", 1.0)
    client.set_terminated(study.info.run_id, "FINISHED")
    return {key: value[2] for key, value in best.items()}


def test_report_rows_match_mlflow_best_runs(store, tmp_path: Path) -> None:
    result = write_report(EXPERIMENT, tmp_path / "reports")
    client = MlflowClient()
    assert {(r.category, r.backbone): r.run_id for r in result.rows} == store
    for row in result.rows:
        logged = client.get_run(row.run_id).data.metrics
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert row.ours[metric] == logged[f"best/{metric}"]
        if row.category in CAIT_PER_CATEGORY:
            image, seed_image, pixel, _ = CAIT_PER_CATEGORY[row.category]
            assert row.diff("image_auroc") == pytest.approx(logged["best/image_auroc"] - image)
            assert row.diff("pixel_auroc") == pytest.approx(logged["best/pixel_auroc"] - pixel)
            assert row.reference("image_auroc", "seed") == seed_image
        else:
            assert row.paper is None and row.diff("image_auroc") is None
    assert row.diff("aupro") is None  # the paper reports no AUPRO

    markdown = (tmp_path / "reports" / "paper_gap.md").read_text()
    assert ("| bottle | resnet18 | 1 | 0.970 | 1.000 | 1.000 | 1.000 (resnet18) | -0.030 | 0.960 | 0.977 | 0.983 "
            "| 0.991 (deit) | -0.017 | 0.850 |") in markdown
    assert "| screw | resnet18 | 1 | 0.600 | 0.978 | 0.846 | 0.839 (wide_resnet50_2) | -0.378 |" in markdown
    assert "| mean (2) | resnet18 |  | 0.785 |" in markdown
    other = markdown.split("## Other categories")[1]
    assert "| tire | resnet18 | 1 | 0.700 | 0.750 | 0.400 |" in other and "bottle" not in other
    assert "image AUROC .979" not in markdown and "image AUROC 0.979, pixel AUROC 0.972" in markdown
    page = (tmp_path / "reports" / "paper_gap.html").read_text()
    assert "data:image/png;base64," in page and 'href="paper_gap.png"' in page and "tire" in page
    assert (tmp_path / "reports" / "paper_gap.png").read_bytes()[:4] == b"\x89PNG"

    report_run = client.get_run(result.run_id)
    assert report_run.info.run_name == "report" and report_run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(result.run_id, "report")} == {
        "report/paper_gap.md", "report/paper_gap.html", "report/paper_gap.png"}
    assert report_run.data.metrics["report/resnet18/mean_image_auroc_gap"] == pytest.approx(
        ((0.97 - 1.0) + (0.60 - 0.978)) / 2)

    # a second report does not pick up the first report run
    again = write_report(EXPERIMENT, tmp_path / "reports")
    assert [(r.category, r.backbone, r.run_id) for r in again.rows] == [
        (r.category, r.backbone, r.run_id) for r in result.rows]


def test_report_errors_and_cli(store, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=f"unknown experiment 'nope'; experiments: .*{EXPERIMENT}"):
        write_report("nope", tmp_path)
    MlflowClient().create_experiment("empty", artifact_location=(tmp_path / "a2").as_uri())
    with pytest.raises(LookupError, match="experiment 'empty'"):
        write_report("empty", tmp_path)
    assert cli.main(["report", "--experiment", EXPERIMENT, "--out", str(tmp_path / "cli")]) == 0
    assert "4 rows (best configuration per category, backbone and selection protocol)" in capsys.readouterr().out
    assert (tmp_path / "cli" / "paper_gap.html").is_file()


def test_each_row_is_chosen_by_its_own_protocol(store, tmp_path: Path) -> None:
    """A leak-free tie on validation image AUROC is broken by validation pixel AUROC, never by a test metric;
    test-set rows rank by test metrics; both rows are shown, with fidelity figures, and so are studies."""
    client = MlflowClient()
    experiment_id = client.create_experiment("report-protocols", artifact_location=(tmp_path / "a").as_uri())

    def run(tags: dict, metrics: dict) -> str:
        created = client.create_run(experiment_id, tags={"category": "bottle", "backbone": "resnet18", **tags})
        for key, value in metrics.items():
            client.log_metric(created.info.run_id, key, value)
        client.set_terminated(created.info.run_id, "FINISHED")
        return created.info.run_id

    leak_free = {"selection_metric": "val_image_auroc", "selection_protocol": LEAK_FREE.label}
    paper = {"selection_metric": "image_auroc", "selection_protocol": PAPER.label}
    run(leak_free, {"best/val_image_auroc": 1.0, "best/val_pixel_auroc": 0.90, "best/image_auroc": 0.99})
    chosen_lf = run(leak_free, {"best/val_image_auroc": 1.0, "best/val_pixel_auroc": 0.95, "best/image_auroc": 0.80,
                                "fidelity/spearman": 0.6, "fidelity/optimism": 0.05, "fidelity/points": 10,
                                "fidelity/test_reliability": -0.2, "best/off_defect_image_auroc": 0.78})
    run(leak_free, {"best/val_image_auroc": 0.9, "best/val_pixel_auroc": 0.99, "best/image_auroc": 1.0})
    run(paper, {"best/image_auroc": 0.97, "best/pixel_auroc": 0.99, "best/val_image_auroc": 1.0})
    chosen_paper = run(paper, {"best/image_auroc": 0.98, "best/pixel_auroc": 0.90, "best/val_image_auroc": 0.7})
    study = client.create_run(experiment_id, run_name="fastflow-bottle-demo",
                              tags={"role": "study", "study": "fastflow-bottle-demo", "category": "bottle",
                                    "selection_protocol": LEAK_FREE.label})
    for key, value in (("fidelity/spearman", 0.55), ("fidelity/optimism", 0.02), ("fidelity/points", 8),
                       ("fidelity/test_reliability", 0.7)):
        client.log_metric(study.info.run_id, key, value)
    client.set_terminated(study.info.run_id, "FINISHED")

    result = write_report("report-protocols", tmp_path / "protocols", log_to_mlflow=False)
    assert {(r.protocol, r.run_id) for r in result.rows} == {("leak-free", chosen_lf), ("test-set", chosen_paper)}
    row = next(r for r in result.rows if r.protocol == "leak-free")
    assert row.ours["image_auroc"] == 0.80 and row.validation["val_pixel_auroc"] == 0.95
    assert row.fidelity == {"spearman": 0.6, "optimism": 0.05, "points": 10, "test_reliability": -0.2,
                            "off_defect": 0.78}
    markdown = (tmp_path / "protocols" / "paper_gap.md").read_text()
    assert "| bottle | resnet18 | 1 | 0.800 | 1.000 | 1.000 | 1.000 (resnet18) | -0.200 |" in markdown
    assert "| 1.000 | 0.950 | +0.600 | 0.050 | -0.200 | 0.780 | - | leak-free |" in markdown
    assert "| bottle | resnet18 | 1 | 0.980 |" in markdown and "| test-set |" in markdown
    assert "## Studies: selection fidelity" in markdown
    assert f"| fastflow-bottle-demo | bottle | {LEAK_FREE.label} | 8 | +0.550 | 0.020 | +0.700 |" in markdown


def test_seeds_of_one_configuration_are_one_row_with_spread_and_interval(tmp_path: Path) -> None:
    """Runs identical but for train.seed are averaged; the best configuration wins on its mean, not on its luckiest
    seed; the interval is the bootstrap of the mean over the seeds' per-image test scores and binned pixels."""
    client = MlflowClient()
    experiment_id = client.create_experiment("report-seeds", artifact_location=(tmp_path / "a").as_uri())
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20, int), np.ones(40, int)]
    masks = np.zeros((60, 16, 16), bool)
    masks[20:, 4:9, 4:9] = True

    def run(lr: str, seed: int, separation: float) -> tuple[str, np.ndarray]:
        scores = rng.normal(size=60) + separation * labels
        maps = rng.normal(size=masks.shape) + separation * masks
        created = client.create_run(experiment_id, tags={"category": "screw", "backbone": "tf_efficientnet_lite0",
                                                         "selection_metric": "image_auroc", "data_hash": "abc"})
        run_id = created.info.run_id
        for key, value in {"train.seed": seed, "train.lr": lr, "train.num_threads": seed}.items():
            client.log_param(run_id, key, value)
        for key, value in (("image_auroc", image_auroc(labels, scores)), ("pixel_auroc", pixel_auroc(masks, maps)),
                           ("aupro", 0.5)):
            client.log_metric(run_id, f"best/{key}", value)
        client.log_dict(run_id, {"images": [f"{i}.png" for i in range(60)], "labels": labels.tolist(),
                                 "scores": scores.tolist()}, "test_scores.json")
        normal, defect = pixel_counts(masks, maps)
        np.savez_compressed(tmp_path / "test_pixel_counts.npz", normal=normal, defect=defect)
        client.log_artifact(run_id, str(tmp_path / "test_pixel_counts.npz"))
        client.set_terminated(run_id, "FINISHED")
        return run_id, scores

    seeds = [run("1e-3", seed, 1.5) for seed in (0, 1, 2)]
    lucky = [run("3e-3", 0, 3.0), run("3e-3", 1, 0.0), run("3e-3", 2, 0.0)]  # one great seed, a worse mean
    result = write_report("report-seeds", tmp_path / "seeds", log_to_mlflow=False)
    row, = result.rows
    assert row.run_ids == [run_id for run_id, _ in seeds] and row.seeds == 3
    image = [client.get_run(run_id).data.metrics["best/image_auroc"] for run_id, _ in seeds]
    assert row.ours["image_auroc"] == pytest.approx(np.mean(image))
    assert row.spread["image_auroc"] == pytest.approx(np.std(image, ddof=1))
    assert row.intervals["image_auroc"] == pytest.approx(
        image_auroc_interval(labels, np.stack([scores for _, scores in seeds])))
    low, high = row.intervals["pixel_auroc"]
    assert low < row.ours["pixel_auroc"] < high
    markdown = (tmp_path / "seeds" / "paper_gap.md").read_text()
    low, high = row.intervals["image_auroc"]
    assert (f"| screw | tf_efficientnet_lite0 | 3 | {np.mean(image):.3f} ± {np.std(image, ddof=1):.3f} "
            f"[{low:.3f}, {high:.3f}] | 0.978 | 0.846 | 0.839 (wide_resnet50_2) |") in markdown
    assert lucky[0][0] not in {r.run_id for r in result.rows}


def test_each_configuration_gets_a_knn_reference_row_beside_it(tmp_path: Path) -> None:
    """Runs that logged `reference/*` get a row "kNN on the same features" (mean ± sd over the seeds, leak-free),
    apart from ours: the gap chart and the report run's mean gaps read our rows only."""
    client = MlflowClient()
    experiment_id = client.create_experiment("report-reference", artifact_location=(tmp_path / "a").as_uri())
    reference = {0: (0.93, 0.990, 0.90, 0.70), 1: (0.95, 0.992, 0.92, 0.72)}
    for seed, (image, pixel, aupro, off_defect) in reference.items():
        run_id = client.create_run(experiment_id, tags={"category": "screw", "backbone": "tf_efficientnet_lite0",
                                                        "selection_metric": "val_image_auroc"}).info.run_id
        client.log_param(run_id, "train.seed", seed)
        for key, value in {"best/image_auroc": 0.70, "best/pixel_auroc": 0.96, "best/aupro": 0.85,
                           "best/val_image_auroc": 0.9, "reference/image_auroc": image, "reference/pixel_auroc": pixel,
                           "reference/aupro": aupro, "reference/off_defect_image_auroc": off_defect}.items():
            client.log_metric(run_id, key, value, step=0)
        client.set_terminated(run_id, "FINISHED")
    result = write_report("report-reference", tmp_path / "out", log_to_mlflow=True)
    (ours,), (knn,) = result.rows, result.reference_rows
    assert ours.implementation == "" and knn.implementation == "kNN on the same features"
    assert knn.protocol == LEAK_FREE.name and knn.run_ids == ours.run_ids and knn.epoch is None
    assert knn.ours["image_auroc"] == pytest.approx(0.94) and knn.spread["image_auroc"] == pytest.approx(
        np.std([0.93, 0.95], ddof=1))
    assert knn.fidelity["off_defect"] == pytest.approx(0.71)
    markdown = (tmp_path / "out" / "paper_gap.md").read_text()
    assert "| screw | tf_efficientnet_lite0 (kNN on the same features, measured here) | 2 | 0.940 ± 0.014 |" in markdown
    logged = client.get_run(result.run_id).data.metrics
    assert logged["report/tf_efficientnet_lite0/leak-free/mean_image_auroc_gap"] == pytest.approx(0.70 - 0.978)
