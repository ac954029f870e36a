"""An interrupted `fastflow predict` accounts for itself: a real SIGINT/SIGTERM while a real process scores a folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastflow.engine.train import train_and_evaluate

from conftest import REPO, TINY_RUN, fast_config

IMAGES = 200


@pytest.fixture(scope="module")
def scoring_job(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[Path, Path]:
    """(a checkpoint of a 1-epoch run, a folder of 200 real synthetic pictures)."""
    tmp = tmp_path_factory.mktemp("interrupted-predict")
    cfg = fast_config(tmp, *TINY_RUN, "tracking.enabled=false", data_root=synthetic_root)
    checkpoint = tmp / "checkpoint.pt"
    torch.save(train_and_evaluate(cfg).checkpoint, checkpoint)
    folder = tmp / "inputs"
    folder.mkdir()
    pictures = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))
    for i in range(IMAGES):
        shutil.copyfile(pictures[i % len(pictures)], folder / f"{i:03d}.png")
    return checkpoint, folder


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupted_predict_writes_what_it_scored_and_says_so(scoring_job, tmp_path: Path, signum: int):
    """Failed before the fix: exit 130 with `interrupted`, overlay PNGs and no results.csv/json (SIGTERM: killed
    outright, nothing said)."""
    checkpoint, folder = scoring_job
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "fastflow.cli", "predict", "--model", str(checkpoint),
                                "--input", str(folder), "--out", str(out), "--batch-size", "2"], cwd=REPO,
                               env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*_overlay.png"))) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert 7 <= len(rows) < IMAGES  # what was scored before the signal (the 8th image's row may still be due)
    assert [Path(row["image"]).name for row in rows] == [f"{i:03d}.png" for i in range(len(rows))]
    assert all((out / row["overlay"]).is_file() and (out / row["mask"]).is_file() for row in rows)
    summary = json.loads((out / "results.json").read_text())
    assert summary["interrupted"] is True and summary["images_to_score"] == IMAGES
    assert len(summary["images"]) == len(rows)
    last = err.strip().splitlines()[-1]
    assert last == (f"{len(rows)} of {IMAGES} images scored before the interruption; their results are in "
                    f"{out / 'results.csv'} and results.json; a re-run scores every image again"), err
    assert "Traceback" not in err
