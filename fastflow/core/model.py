"""FastFlow: frozen backbone -> (LayerNorm for CNN features) -> one 2D flow per scale."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fastflow.core.backbone import create_backbone, default_normalization, is_transformer_name
from fastflow.core.flow import build_flow, run_flow
from fastflow.core.knn import local_average
from fastflow.runtime.config import ModelConfig


class FastFlow(nn.Module):
    """`forward(images)` returns per-scale latents `z_i (B,C_i,h_i,w_i)` and log-Jacobians `(B,h_i,w_i)`.

    `forward_features` does the same from cached backbone features, so the frozen backbone can run
    once per image instead of once per epoch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.backbone, cfg.weights, cfg.feature_indices, cfg.input_size)
        mean, std = default_normalization(cfg.backbone)
        if cfg.exposure == "mean":  # the training images' mean level, set by `set_exposure_level` before training
            self.register_buffer("exposure_level", torch.tensor(0.5))
        self.register_buffer("mean", torch.tensor(cfg.mean or mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std or std).view(1, 3, 1, 1))
        shapes = [(c, cfg.input_size // s, cfg.input_size // s) for c, s in
                  zip(self.backbone.channels, self.backbone.strides)]
        self.shapes = shapes
        self.norms = nn.ModuleList(feature_norm(cfg, shape) for shape in shapes)  # after `local_average`
        self.flows = nn.ModuleList(
            build_flow(*shape, cfg.flow_steps, cfg.conv3x3_only, cfg.hidden_ratio, cfg.clamp) for shape in shapes)

    def use_feature_norm(self, kind: str) -> None:
        """Fresh norms of `kind` (`model.feature_norm: auto`, once the training features have chosen it)."""
        self.cfg = replace(self.cfg, feature_norm=kind)
        device = self.mean.device
        self.norms = nn.ModuleList(feature_norm(self.cfg, shape) for shape in self.shapes).to(device)

    def set_exposure_level(self, level: float) -> None:
        """The mean grey level (in [0,1]) that `model.exposure: mean` scales every image to."""
        self.exposure_level.fill_(level)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """`(B,3,H,W)` RGB in [0,1] -> the backbone's normalization; with `exposure: mean`, each image is first
        scaled so that its mean level is the training images' (a brighter or darker light or exposure multiplies
        every pixel: this undoes it, while a local defect hardly moves an image's mean)."""
        if self.cfg.exposure == "mean":
            images = images * (self.exposure_level / images.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3))
        return (images - self.mean) / self.std

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone features of RGB images in [0,1] at the input size."""
        self.backbone.eval()
        return self.backbone(self.normalize(images))

    def forward_features(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        latents, log_jacs = [], []
        for feature, norm, flow in zip(features, self.norms, self.flows):
            z, log_jac = run_flow(flow, norm(local_average(feature.float(), self.cfg.feature_pool)))
            latents.append(z)
            log_jacs.append(log_jac)
        return latents, log_jacs

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.forward_features(self.extract_features(images))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position, with one affine per channel: `(B,C,H,W) -> (B,C,H,W)`. The
    same at every position, so the flows see a part the same wherever it lies."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def feature_norm(cfg: ModelConfig, shape: tuple[int, int, int]) -> nn.Module:
    """The trainable normalisation of one scale's CNN features (transformer features come normed): `chw`, the
    paper's LayerNorm over `(C,H,W)` with an affine per position (gathierry); `channel`, over C at each position
    (`auto` builds the paper's until `FastFlow.use_feature_norm` sets the chosen one)."""
    if is_transformer_name(cfg.backbone):
        return nn.Identity()
    if cfg.feature_norm == "channel":
        return ChannelNorm(shape[0])
    return nn.LayerNorm(list(shape), elementwise_affine=True)


def count_parameters(modules: nn.Module) -> int:
    return sum(p.numel() for p in modules.parameters() if p.requires_grad)
