"""Evaluation of a FastFlow model on encoded (backbone-feature) splits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics as M
from .anomaly_map import scale_maps
from .config import RunConfig
from .data import ImageDataset, Sample, source_of
from .features import EncodedSplit
from .loss import nll_loss
from .scoring import NormalStats, cross_fitted, image_nll, normal_stats, score


@dataclass
class Evaluation:
    metrics: dict[str, float]
    scores: np.ndarray  # (N,) image scores
    labels: np.ndarray  # (N,)
    loss: float
    images_per_s: float
    shown: list[int] = field(default_factory=list)
    shown_maps: torch.Tensor | None = None  # (k,1,S,S)
    maps: torch.Tensor | None = None  # (N,1,S,S) every image's map, for `intervals`

    def intervals(self, masks: torch.Tensor) -> dict[str, float]:
        """Bootstrap intervals over the split's images (`metrics.INTERVAL_LEVEL`) of its image AUROC and, when
        `masks` `(N,1,S,S)` hold defect pixels and the maps were kept, its pixel AUROC."""
        values = dict(zip(M.interval_keys("image_auroc"), M.image_auroc_interval(self.labels, self.scores)))
        if self.maps is not None and bool(masks.any()):
            values.update(zip(M.interval_keys("pixel_auroc"),
                              M.pixel_auroc_interval(masks[:, 0].numpy(), self.maps[:, 0].numpy())))
        return values

    def normal_scores(self) -> np.ndarray:
        return self.scores[self.labels == 0]

    def shown_images(self, samples: list[Sample], size: int) -> torch.Tensor:
        """The shown test images `(k,3,S,S)` in [0,1], loaded from disk (a handful per evaluation)."""
        dataset = ImageDataset([samples[i] for i in self.shown], size)
        return torch.stack([dataset[i][0] for i in range(len(dataset))]) if self.shown else torch.empty(0)


def heatmap_indices(labels: torch.Tensor, count: int) -> list[int]:
    """A fixed choice of `count` test images: about two thirds defective, the rest good, spread evenly."""
    defective = torch.nonzero(labels == 1).flatten().tolist()
    good = torch.nonzero(labels == 0).flatten().tolist()
    n_defective = min(len(defective), count - min(len(good), count // 3))
    n_good = min(len(good), count - n_defective)
    pick = lambda rows, n: [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n)] if n else []
    return pick(defective, n_defective) + pick(good, n_good)


@torch.inference_mode()
def predict_maps(model, split: EncodedSplit, cfg: RunConfig, device: torch.device,
                 stats: NormalStats | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Anomaly maps `(N,1,S,S)` and image scores `(N,)` on the CPU, and the mean NLL loss over the split."""
    model.eval()
    m = cfg.model
    size = (m.input_size, m.input_size)
    maps, scores, loss_sum = [], [], 0.0
    for start in range(0, len(split), cfg.eval.batch_size):
        indices = torch.arange(start, min(start + cfg.eval.batch_size, len(split)))
        latents, log_jacs = model.forward_features(split.batch(indices, device))
        loss_sum += nll_loss(latents, log_jacs).item() * len(indices)
        batch_maps, batch_scores = score(latents, log_jacs, size, m.anomaly_map, m.map_norm, m.image_score,
                                         m.topk_fraction, stats, m.score_norm)
        maps.append(batch_maps.cpu())
        scores.append(batch_scores.cpu())
    return torch.cat(maps), torch.cat(scores), loss_sum / len(split)


@torch.inference_mode()
def scale_outputs(model, split: EncodedSplit, rows: torch.Tensor, cfg: RunConfig,
                  device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Per-scale maps `[(n,1,h,w)]` and image NLLs `(n, n_scales)` of `rows` on the CPU, and their mean NLL loss."""
    model.eval()
    maps, nll, loss_sum = [], [], 0.0
    for start in range(0, len(rows), cfg.eval.batch_size):
        batch = rows[start:start + cfg.eval.batch_size]
        latents, log_jacs = model.forward_features(split.batch(batch, device))
        loss_sum += nll_loss(latents, log_jacs).item() * len(batch)
        maps.append([m.cpu() for m in scale_maps(cfg.model.anomaly_map, latents, log_jacs)])
        nll.append(image_nll(latents, log_jacs).cpu())
    return [torch.cat(scale) for scale in zip(*maps)], torch.cat(nll), loss_sum / max(len(rows), 1)


def held_out_stats(model, split: EncodedSplit, cfg: RunConfig, device: torch.device) -> NormalStats:
    """Statistics of the split's normal images (label 0) under `model`: the held-out normals, never test images."""
    maps, nll, _ = scale_outputs(model, split, torch.nonzero(split.labels == 0).flatten(), cfg, device)
    return normal_stats(maps, nll)


def cross_fitted_maps(model, split: EncodedSplit, cfg: RunConfig,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`predict_maps` of a validation split (held-out normals, then anomalous copies of them), each row
    standardised with the statistics of the other held-out normals (`scoring.cross_fitted`)."""
    m = cfg.model
    per_scale, nll, loss = scale_outputs(model, split, torch.arange(len(split)), cfg, device)
    normal = torch.nonzero(split.labels == 0).flatten()
    source = torch.tensor([source_of(row, len(normal)) for row in range(len(split))])
    maps, scores = cross_fitted(per_scale, nll, normal, source, (m.input_size, m.input_size), m.map_norm,
                                m.image_score, m.topk_fraction, m.score_norm)
    return maps, scores, loss


def evaluate_split(model, split: EncodedSplit, cfg: RunConfig, device: torch.device,
                   keep_maps: list[int] | None = None, pixel_metrics: bool = True,
                   stats: NormalStats | None = None, cross_fit: bool = False) -> Evaluation:
    """Scores, maps and metrics of `split`, standardised with `stats`; with `cross_fit` (the validation split,
    whose normals the statistics come from) each row with the statistics of the other held-out normals (when
    there are at least two)."""
    start = time.perf_counter()
    if cross_fit and stats is not None and int((split.labels == 0).sum()) >= 2:
        maps, scores, loss = cross_fitted_maps(model, split, cfg, device)
    else:
        maps, scores, loss = predict_maps(model, split, cfg, device, stats)
    scores = scores.numpy()
    images_per_s = len(split) / (time.perf_counter() - start)
    labels = split.labels.numpy()
    if pixel_metrics:
        values = M.evaluate(labels, scores, split.masks[:, 0].numpy(), maps[:, 0].numpy(), cfg.eval.aupro_fpr_limit)
    else:
        values = {"image_auroc": M.image_auroc(labels, scores)}
    shown = keep_maps or []
    return Evaluation(values, scores, labels, loss, images_per_s, shown, maps[shown] if shown else None, maps)


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
    m = cfg.model
    score(latents, log_jacs, size, m.anomaly_map, m.map_norm, m.image_score, m.topk_fraction, stats, m.score_norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)
