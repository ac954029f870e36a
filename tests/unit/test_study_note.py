"""The run descriptions a study writes (MLflow run notes): they fit MLflow's tag limit and user text cannot break
their markdown. Stored on a real sqlite MLflow store and read back through MlflowClient."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fastflow.engine.protocol import LEAK_FREE
from fastflow.pages.study_note import NOTE_LIMIT, study_description, trial_description
from fastflow.pages.study_page import TrialRow
from fastflow.pages.visualize import decision
from fastflow.tracking.runs import NOTE_TAG, set_descriptions

from conftest import mlflow_store


def _row(number: int, state: str = "complete", note: str = "", value: float = 0.8) -> TrialRow:
    metrics = {"val_image_auroc": value, "image_auroc": 0.7, "pixel_auroc": 0.9, "aupro": 0.5, "epoch": 3.0}
    return TrialRow(number, state, value if state == "complete" else None,
                    {"train.lr": 1e-3, "model.anomaly_map": "nll", "preset": "efficientnet_lite0"},
                    metrics if state == "complete" else {}, run_id=f"{number:032x}", run_name=f"trial-{number:03d}",
                    experiment_id="1", note=note,
                    intervals={"val_image_auroc": (value - 0.1, value + 0.05), "image_auroc": (0.6, 0.8),
                               "pixel_auroc": (0.85, 0.95)} if state == "complete" else {},
                    place=number + 1 if state == "complete" else None)


def _store_and_read(tmp_path: Path, text: str) -> str:
    client = MlflowClient(mlflow_store(tmp_path))
    run_id = client.create_run(client.create_experiment("notes")).info.run_id
    mlflow.set_tracking_uri(client.tracking_uri)
    set_descriptions({run_id: text})
    return client.get_run(run_id).data.tags[NOTE_TAG]


def _cells(line: str) -> int:
    return line.count("|")


def test_a_long_study_fits_mlflows_tag_limit(tmp_path: Path) -> None:
    rows = [_row(n, value=0.9 - n / 1000) for n in range(300)]
    text = study_description("long-study", "synthetic", LEAK_FREE, rows, "1", "f" * 32)
    stored = _store_and_read(tmp_path, text)
    assert stored == text and len(stored) <= NOTE_LIMIT  # nothing cut by the store
    table = [line for line in stored.splitlines() if line.startswith("|")]
    shown = len(table) - 3  # header, separator, the line counting the rest
    assert 10 < shown < 300 and f"{300 - shown} more trials: see `study.html`" in table[-1]
    assert len({_cells(line) for line in table}) == 1
    assert "Load: `mlflow.pyfunc.load_model(" in stored.splitlines()[0]  # the first line: the best trial, how to load


def test_user_text_cannot_break_the_markdown(tmp_path: Path) -> None:
    error = "ValueError: a|b <script>alert(1)</script> `x` [link](http://evil) *bold* _under_"
    rows = [_row(0), _row(1, "failed", note=error)]
    rows[0].params["model.anomaly_map"] = "n|l*l"
    text = study_description("study|x", "cat`egory", LEAK_FREE, rows, "1", "f" * 32)
    stored = _store_and_read(tmp_path, text)
    table = [line for line in stored.splitlines() if line.startswith("|")]
    assert len({_cells(line) for line in table}) == 1  # every row has the header's cells: no '|' leaked
    assert "<script>" not in stored and "](http://evil)" not in stored and "*bold*" not in stored
    assert "&lt;script&gt;" in stored  # shown, as text
    failed = trial_description(rows[1], LEAK_FREE, 1, "study|x", "#/experiments/1/runs/" + "f" * 32)
    assert "<script>" not in failed and failed.startswith("**failed (ValueError: a&#124;b")


def test_decisions_at_the_stored_threshold() -> None:
    assert decision(1, 0.9, 0.5) == "hit" and decision(1, 0.2, 0.5) == "miss"
    assert decision(0, 0.9, 0.5) == "false alarm" and decision(0, 0.2, 0.5) == "correct"
    assert decision(1, 0.5, 0.5) == "hit"  # flagged at the threshold, as predict decides (score >= threshold)
