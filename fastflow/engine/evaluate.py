"""Evaluation of a FastFlow model on encoded (backbone-feature) splits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastflow.core import metrics as M
from fastflow.core.anomaly_map import scale_maps
from fastflow.core.loss import nll_loss
from fastflow.core.scoring import (NormalStats, ScoreSettings, cross_fitted, image_nll, normal_stats, off_defect_scores,
                                   score, score_scales)
from fastflow.data.dataset import ImageDataset, Sample, source_of
from fastflow.data.features import EncodedSplit
from fastflow.runtime.config import RunConfig


@dataclass
class Evaluation:
    metrics: dict[str, float]
    scores: np.ndarray  # (N,) image scores
    labels: np.ndarray  # (N,)
    loss: float
    images_per_s: float
    shown: list[int] = field(default_factory=list)
    shown_maps: torch.Tensor | None = None  # (k,1,S,S)
    maps: torch.Tensor | None = None  # (N,1,S,S) every image's map

    def pixel_counts(self, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """`metrics.pixel_counts` of the split (masks `(N,1,S,S)`), or None when it has no defect pixel."""
        if self.maps is None or not bool(masks.any()):
            return None
        return M.pixel_counts(masks[:, 0].numpy(), self.maps[:, 0].numpy())

    def normal_scores(self) -> np.ndarray:
        return self.scores[self.labels == 0]


def load_images(samples: list[Sample], indices: list[int], size: int) -> torch.Tensor:
    """The images `indices` of `samples` as `(k,3,S,S)` in [0,1] (the shown test images: loaded once per run)."""
    dataset = ImageDataset([samples[i] for i in indices], size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]) if indices else torch.empty(0)


def heatmap_indices(labels: torch.Tensor, count: int) -> list[int]:
    """A fixed choice of `count` test images: about two thirds defective, the rest good, spread evenly."""
    defective = torch.nonzero(labels == 1).flatten().tolist()
    good = torch.nonzero(labels == 0).flatten().tolist()
    n_defective = min(len(defective), count - min(len(good), count // 3))
    n_good = min(len(good), count - n_defective)
    pick = lambda rows, n: [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n)] if n else []
    return pick(defective, n_defective) + pick(good, n_good)


@dataclass
class FlowOutputs:
    """What the flows give for a split, on the CPU: per-scale maps `[(N,1,h,w)]`, per-scale image NLLs
    `(N, n_scales)`, the mean NLL loss, and the seconds the pass took. Everything a split's scores, its held-out
    statistics and its leave-one-out scores are computed from: one pass of the flows per split and evaluation.
    `score_maps`: per-scale maps of the kind the image score reads, when it is not the output map's
    (`model.score_map`); held-out statistics are then theirs."""

    maps: list[torch.Tensor]
    nll: torch.Tensor
    loss: float
    seconds: float
    score_maps: list[torch.Tensor] | None = None

    def read_maps(self) -> list[torch.Tensor]:
        """The per-scale maps the image score reads."""
        return self.score_maps if self.score_maps is not None else self.maps


@torch.inference_mode()
def flow_outputs(model, split: EncodedSplit, cfg: RunConfig, device: torch.device,
                 rows: torch.Tensor | None = None) -> FlowOutputs:
    """The flows' outputs for `rows` of `split` (default: all), in batches of `eval.batch_size`."""
    start = time.perf_counter()
    model.eval()
    rows = torch.arange(len(split)) if rows is None else rows
    other = ScoreSettings.of(cfg.model).score_kind
    maps, score_maps, nll, loss_sum = [], [], [], 0.0
    for first in range(0, len(rows), cfg.eval.batch_size):
        batch = rows[first:first + cfg.eval.batch_size]
        latents, log_jacs = model.forward_features(split.batch(batch, device))
        loss_sum += nll_loss(latents, log_jacs).item() * len(batch)
        maps.append([m.cpu() for m in scale_maps(cfg.model.anomaly_map, latents, log_jacs)])
        if other:
            score_maps.append([m.cpu() for m in scale_maps(other, latents, log_jacs)])
        nll.append(image_nll(latents, log_jacs).cpu())
    join = lambda batches: [torch.cat(scale) for scale in zip(*batches)]
    return FlowOutputs(join(maps), torch.cat(nll), loss_sum / max(len(rows), 1), time.perf_counter() - start,
                       join(score_maps) if other else None)


def held_out_stats(outputs: FlowOutputs, labels: torch.Tensor) -> NormalStats:
    """Statistics of the normal rows (label 0) of a validation split's outputs: held-out normals, never test images."""
    normal = torch.nonzero(labels == 0).flatten()
    return normal_stats([m[normal] for m in outputs.read_maps()], outputs.nll[normal])


def score_outputs(outputs: FlowOutputs, split: EncodedSplit, cfg: RunConfig, stats: NormalStats | None = None,
                  cross_fit: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anomaly maps `(N,1,S,S)`, the maps the image scores read, image scores `(N,)`) standardised with `stats`;
    with `cross_fit` (a validation split, whose normals the statistics come from) each row with the statistics of
    the other held-out normals (`scoring.cross_fitted`, when there are at least two)."""
    settings = ScoreSettings.of(cfg.model)
    size = (cfg.model.input_size, cfg.model.input_size)
    normal = torch.nonzero(split.labels == 0).flatten()
    if cross_fit and stats is not None and len(normal) >= 2:
        source = torch.tensor([source_of(row, len(normal)) for row in range(len(split))])
        return cross_fitted(outputs.maps, outputs.nll, normal, source, size, settings, outputs.score_maps)
    return score_scales(outputs.maps, outputs.nll, size, settings, stats, outputs.score_maps)


def evaluate_outputs(outputs: FlowOutputs, split: EncodedSplit, cfg: RunConfig, stats: NormalStats | None = None,
                     cross_fit: bool = False, keep_maps: list[int] | None = None,
                     pixel_metrics: bool = True) -> Evaluation:
    """Scores, maps and metrics of `split` from its flow outputs (`score_outputs`); with `pixel_metrics` and defect
    masks, also the image AUROC with the defect regions left out (`M.OFF_DEFECT`, a diagnostic)."""
    start = time.perf_counter()
    maps, scored, scores = score_outputs(outputs, split, cfg, stats, cross_fit)
    scores = scores.numpy()
    images_per_s = len(split) / (outputs.seconds + time.perf_counter() - start)
    labels = split.labels.numpy()
    if pixel_metrics:
        values = M.evaluate(labels, scores, split.masks[:, 0].numpy(), maps[:, 0].numpy(), cfg.eval.aupro_fpr_limit)
        off_defect = off_defect_scores(scored, split.masks, ScoreSettings.of(cfg.model))
        if off_defect is not None and bool(split.masks.any()):
            values[M.OFF_DEFECT] = M.image_auroc(labels, off_defect.numpy())
    else:
        values = {"image_auroc": M.image_auroc(labels, scores)}
    shown = keep_maps or []
    return Evaluation(values, scores, labels, outputs.loss, images_per_s, shown, maps[shown] if shown else None, maps)


def evaluate_split(model, split: EncodedSplit, cfg: RunConfig, device: torch.device,
                   keep_maps: list[int] | None = None, pixel_metrics: bool = True,
                   stats: NormalStats | None = None, cross_fit: bool = False) -> Evaluation:
    """`evaluate_outputs` of one pass of the flows over `split`."""
    return evaluate_outputs(flow_outputs(model, split, cfg, device), split, cfg, stats, cross_fit, keep_maps,
                            pixel_metrics)


@dataclass
class EpochEvaluation:
    """An evaluation of the test split and (when there are held-out normals) of the validation split, scored with
    statistics taken from the same pass over the validation split that its leave-one-out scores come from."""

    test: Evaluation
    validation: Evaluation | None
    stats: NormalStats | None


def evaluate_epoch(model, test: EncodedSplit, validation: EncodedSplit | None, cfg: RunConfig, device: torch.device,
                   keep_maps: list[int] | None = None, pixel_metrics: bool = True) -> EpochEvaluation:
    """Test and validation evaluation with one pass of the flows over each split; `pixel_metrics` for validation."""
    outputs = flow_outputs(model, validation, cfg, device) if validation is not None else None
    needs_stats = ScoreSettings.of(cfg.model).needs_stats
    stats = held_out_stats(outputs, validation.labels) if outputs is not None and needs_stats else None
    tested = evaluate_split(model, test, cfg, device, keep_maps, stats=stats)
    validated = evaluate_outputs(outputs, validation, cfg, stats, cross_fit=True,
                                 pixel_metrics=pixel_metrics) if outputs is not None else None
    return EpochEvaluation(tested, validated, stats)


@torch.inference_mode()
def measure_inference(model, samples: list[Sample], cfg: RunConfig, device: torch.device, max_images: int = 16,
                      stats: NormalStats | None = None) -> float:
    """End-to-end images/s (backbone + flows + map + score) on up to `max_images` test images."""
    model.eval()
    dataset = ImageDataset(samples[:max_images], cfg.model.input_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    size = (cfg.model.input_size, cfg.model.input_size)
    model(images)  # warm-up at the timed batch shape
    start = time.perf_counter()
    latents, log_jacs = model(images)
    score(latents, log_jacs, size, ScoreSettings.of(cfg.model), stats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)
