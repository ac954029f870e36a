"""`fastflow export`: the ONNX graph (run by onnxruntime) and TorchScript agree with PyTorch's Predictor.forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fastflow import cli
from fastflow.engine.train import train_and_evaluate
from fastflow.serve.export import export_model, export_predictor, run_exported
from fastflow.serve.inference import Predictor

from conftest import TINY_RUN, fast_config

MAP_ATOL = 1e-4  # z2 maps lie in [0, 1]; measured max |diff| ~5e-7
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """A 1-epoch EfficientNet-Lite0 model at 64 px (no tracking), saved as a checkpoint file."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = fast_config(tmp, *TINY_RUN, "tracking.enabled=false", f"train.cache_dir={tmp_path_factory.getbasetemp() / 'feature-cache'}",
                      data_root=synthetic_root)
    path = tmp / "checkpoint.pt"
    torch.save(train_and_evaluate(cfg).checkpoint, path)
    return path


def _compare(predictor: Predictor, path: Path, fmt: str) -> tuple[float, float]:
    """Max |exported - PyTorch| over batch sizes 1 and 4 of real-looking inputs."""
    size = predictor.cfg.model.input_size
    map_diff = score_diff = 0.0
    for batch in (1, 4):
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            maps, scores = predictor(images)
        got_maps, got_scores = run_exported(path, fmt, images.numpy())
        assert got_maps.shape == (batch, 1, size, size) and got_scores.shape == (batch,)
        map_diff = max(map_diff, float(np.abs(got_maps - maps.numpy()).max()))
        score_diff = max(score_diff, float(np.abs(got_scores - scores.numpy()).max()))
    return map_diff, score_diff


def test_onnx_matches_pytorch_on_two_batch_sizes(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "fastflow.onnx"
    result = export_model(str(checkpoint), "onnx", out)
    predictor = Predictor.from_file(checkpoint)
    map_diff, score_diff = _compare(predictor, out, "onnx")
    print(f"onnx z2/max: max |diff| map {map_diff:.2e}, score {score_diff:.2e}")
    assert map_diff < MAP_ATOL and score_diff < SCORE_ATOL
    assert result.max_map_diff < MAP_ATOL and result.batch_sizes == (1, 3)
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["input_size"] == "64" and "f1" in meta["thresholds"] and meta["threshold_kind"] == "val_quantile"


def test_onnx_nll_map_and_topk_score(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["model"].update(anomaly_map="nll", image_score="topk", topk_fraction=0.05)
    predictor = Predictor(state)
    out = tmp_path / "nll.onnx"
    export_predictor(predictor, "onnx", out, check=False)
    map_diff, score_diff = _compare(predictor, out, "onnx")
    scale = float(predictor(torch.rand(1, 3, 64, 64))[0].abs().max())
    print(f"onnx nll/topk: max |diff| map {map_diff:.2e}, score {score_diff:.2e} (map scale {scale:.2f})")
    assert map_diff < MAP_ATOL * max(1.0, scale) and score_diff < SCORE_ATOL * max(1.0, scale)


def test_cli_torchscript_export(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fastflow.ts"
    assert cli.main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |diff| map" in capsys.readouterr().out
    map_diff, score_diff = _compare(Predictor.from_file(checkpoint), out, "torchscript")
    assert map_diff < MAP_ATOL and score_diff < SCORE_ATOL
    assert cli.main(["export", "--model", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
