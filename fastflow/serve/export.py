"""`fastflow export`: one ONNX (or TorchScript) graph of `inference.Predictor.forward`.

Graph: images `(B,3,S,S)` float RGB in [0,1] -> anomaly_map `(B,1,S,S)`, image_score `(B,)`; backbone,
normalization, flows, map and score are all inside, the batch axis is dynamic. The ONNX file's
metadata holds the thresholds, score range and input size, so a deployment needs no Python config.
After writing, the file is run (onnxruntime or torch.jit) on random images and compared with PyTorch.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastflow.serve.inference import Predictor

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OPSET = 17


@dataclass
class ExportResult:
    path: Path
    format: str
    max_map_diff: float  # max |exported - PyTorch| over the check batches
    max_score_diff: float
    batch_sizes: tuple[int, ...]


def metadata(predictor: Predictor) -> dict[str, str]:
    model = predictor.cfg.model
    return {"input_size": str(model.input_size), "input": "images (B,3,S,S) float RGB in [0,1]",
            "outputs": "anomaly_map (B,1,S,S), image_score (B,)", "anomaly_map": model.anomaly_map,
            "image_score": model.image_score, "map_norm": model.map_norm,
            "score_norm": model.score_norm, "backbone": model.backbone, "threshold_kind": predictor.threshold_kind,
            "thresholds": json.dumps({k: float(v) for k, v in predictor.thresholds.items()}),
            "score_range": json.dumps(list(predictor.score_range))}


def export_onnx(predictor: Predictor, out: Path) -> None:
    import onnx

    size = predictor.cfg.model.input_size
    example = torch.rand(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on FrEIA's shape checks
        torch.onnx.export(predictor.eval(), (example,), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["anomaly_map", "image_score"],
                          dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"},
                                        "image_score": {0: "batch"}})
    graph = onnx.load(str(out))
    for key, value in metadata(predictor).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(out))


def export_torchscript(predictor: Predictor, out: Path) -> None:
    size = predictor.cfg.model.input_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(predictor.eval(), torch.rand(2, 3, size, size), check_trace=False)
    torch.jit.save(traced, str(out), _extra_files={"fastflow.json": json.dumps(metadata(predictor))})


def run_exported(path: Path, fmt: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported file: float32 `(B,3,S,S)` -> (maps `(B,1,S,S)`, scores `(B,)`)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        maps, scores = session.run(["anomaly_map", "image_score"], {"images": images})
        return maps, scores
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        maps, scores = module(torch.from_numpy(images))
    return maps.numpy(), scores.numpy()


def check_export(predictor: Predictor, path: Path, fmt: str, batch_sizes: tuple[int, ...] = (1, 3),
                 seed: int = 0) -> tuple[float, float]:
    """Max |exported - PyTorch| of maps and scores on random images, for each batch size."""
    size = predictor.cfg.model.input_size
    generator = torch.Generator().manual_seed(seed)
    map_diff = score_diff = 0.0
    for batch in batch_sizes:
        images = torch.rand(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            maps, scores = predictor(images.to(predictor.device))
        got_maps, got_scores = run_exported(path, fmt, images.numpy())
        if got_maps.shape != tuple(maps.shape) or got_scores.shape != tuple(scores.shape):
            raise RuntimeError(f"exported {fmt} returned shapes {got_maps.shape}, {got_scores.shape}; "
                               f"expected {tuple(maps.shape)}, {tuple(scores.shape)}")
        map_diff = max(map_diff, float(np.abs(got_maps - maps.cpu().numpy()).max()))
        score_diff = max(score_diff, float(np.abs(got_scores - scores.cpu().numpy()).max()))
    return map_diff, score_diff


def export_model(model: str, fmt: str, out: Path, check: bool = True) -> ExportResult:
    """Export `model` (URI, run id or checkpoint path; see predict.load_predictor) to `out` and check it."""
    from fastflow.serve.predict import load_predictor

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; known: {', '.join(FORMATS)}")
    predictor = load_predictor(model, "cpu").eval()
    return export_predictor(predictor, fmt, Path(out), check)


def export_predictor(predictor: Predictor, fmt: str, out: Path, check: bool = True) -> ExportResult:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (export_onnx if fmt == "onnx" else export_torchscript)(predictor, out)
    batch_sizes = (1, 3) if check else ()
    map_diff, score_diff = check_export(predictor, out, fmt, batch_sizes) if check else (float("nan"),) * 2
    log.info("exported %s to %s (max |diff| map %.2e, score %.2e)", fmt, out, map_diff, score_diff)
    return ExportResult(out, fmt, map_diff, score_diff, batch_sizes)


__all__ = ["export_model", "export_predictor", "run_exported", "check_export", "ExportResult", "FORMATS"]
