"""A trained model from its checkpoint: scores and maps for images of any size and mode."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastflow.core.model import FastFlow
from fastflow.core.scoring import NormalStats, ScoreSettings, score_with_map
from fastflow.data.dataset import image_tensor
from fastflow.runtime.checkpoint import CheckpointError, load_checkpoint
from fastflow.runtime.config import ConfigError, RunConfig, config_from_dict


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) raw image scores
    maps: np.ndarray  # (N,S,S) the map the image score reads (the anomaly map unless model.score_norm differs)
    normalized: np.ndarray  # (N,) in [0,1], the threshold maps to 0.5
    is_anomalous: np.ndarray  # (N,) bool


def fit_problem(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Why the tensors `found` in a checkpoint do not fit the model's `expected` ones, in one line ('' if they do).
    Backbone tensors may be absent (rebuilt from the config's weights source)."""
    missing = [k for k in expected if k not in found and not k.startswith("backbone.")]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in found if k in expected and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        key = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape, e.g. {key}: {tuple(found[key].shape)} in the file, "
                     f"{tuple(expected[key].shape)} for the config")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


class Predictor(torch.nn.Module):
    """FastFlow + map + score, with the threshold and score range stored at training time."""

    def __init__(self, checkpoint: dict, device: str = "cpu", label: str = "checkpoint"):
        """`label` names the checkpoint (its file, or its run) in errors."""
        super().__init__()
        try:
            self.cfg: RunConfig = config_from_dict(checkpoint["config"], f"{label}: config")
        except ConfigError as error:
            raise CheckpointError(str(error)) from None
        model_cfg = self.cfg.model
        if any(key.startswith("backbone.") for key in checkpoint["state_dict"]):
            model_cfg = replace(model_cfg, weights="none")  # the checkpoint carries the backbone
        self.model = FastFlow(model_cfg)
        problem = fit_problem(self.model.state_dict(), checkpoint["state_dict"])
        if problem:
            raise CheckpointError(f"{label}: its weights do not fit its config (model.backbone={model_cfg.backbone}, "
                                  f"model.flow_steps={model_cfg.flow_steps}, model.hidden_ratio={model_cfg.hidden_ratio}, "
                                  f"model.conv3x3_only={model_cfg.conv3x3_only}): {problem}")
        self.model.load_state_dict(checkpoint["state_dict"], strict=False)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.threshold_kind = checkpoint["threshold_kind"]
        self.threshold = float(checkpoint["thresholds"][self.threshold_kind])
        self.thresholds = checkpoint["thresholds"]
        self.score_range = checkpoint["score_range"]
        stats = checkpoint.get("normal_stats")
        self.stats = NormalStats.from_dict(stats).to(self.device) if stats is not None else None
        self.score_settings = ScoreSettings.of(model_cfg)
        if self.stats is None and self.score_settings.needs_stats:
            raise CheckpointError(f"{label} holds no held-out normal statistics: {self.score_settings.missing_stats()}")

    @classmethod
    def from_file(cls, path: Path, device: str = "cpu", label: str = "") -> "Predictor":
        """The checkpoint file at `path`, loaded as data; `label` names it in errors (default: the path)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {label or path}")
        return cls(load_checkpoint(Path(path), label), device, f"checkpoint {label or path}")

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B,3,S,S)` RGB in [0,1] -> (anomaly maps, the maps the score reads, both `(B,1,S,S)`, scores `(B,)`)."""
        latents, log_jacs = self.model(images)
        size = (images.shape[-2], images.shape[-1])
        return score_with_map(latents, log_jacs, size, self.score_settings, self.stats)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B,3,S,S)` RGB in [0,1] -> (maps `(B,1,S,S)`, scores `(B,)`); the exportable graph."""
        maps, _, scores = self.outputs(images)
        return maps, scores

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        """Min-max normalization centred on the threshold (anomalib's convention): threshold -> 0.5."""
        low, high = self.score_range
        return np.clip((scores - self.threshold) / max(high - low, 1e-12) + 0.5, 0.0, 1.0)

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> Predictions:
        _, maps, scores = self.outputs(images.to(self.device))  # masks compare the scored map with the threshold
        scores_np = scores.cpu().numpy()
        return Predictions(scores_np, maps[:, 0].cpu().numpy(), self.normalize(scores_np), scores_np >= self.threshold)  # as F1-max counts score >= threshold

    def predict_images(self, images: list[Image.Image]) -> Predictions:
        """PIL images (any size/mode already converted to RGB) -> predictions at the model's input size."""
        size = self.cfg.model.input_size
        return self.predict_tensor(torch.stack([image_tensor(image, size) for image in images]))

    def predict_array(self, array: np.ndarray) -> Predictions:
        """uint8 `(N,H,W,3)` or `(H,W,3)` RGB -> predictions."""
        array = np.asarray(array)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N,H,W,3), got {array.shape}")
        return self.predict_images([Image.fromarray(a.astype(np.uint8)) for a in array])
