"""Anomaly maps from flow outputs (per scale, and fused over scales), and map-based image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAP_SCORES = ("max", "topk", "mean")


def scale_maps(kind: str, latents: list[torch.Tensor], log_jacs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-scale maps `(B,1,h_i,w_i)` at the flows' resolution; higher = more anomalous.

    z2 (gathierry/anomalib): `1 - exp(-0.5 * mean_c z^2)`, their `-exp(..)` shifted by +1 into [0, 1]
    (monotone, so AUROCs are unchanged). nll: per-position negative log-likelihood
    `(0.5*sum_c z^2 - sum_blocks logdet(h,w)) / C`; dividing by C puts scales of different widths on par.
    """
    if kind == "z2":
        return [1.0 - torch.exp(-0.5 * torch.mean(z.float() ** 2, dim=1, keepdim=True)) for z in latents]
    if kind == "nll":
        return [((0.5 * torch.sum(z.float() ** 2, dim=1) - j.float()) / z.shape[1]).unsqueeze(1)
                for z, j in zip(latents, log_jacs)]
    raise ValueError(f"unknown anomaly map '{kind}'; known: z2, nll")


def fuse(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over scales of the bilinearly upsampled maps; `-> (B,1,H,W)`."""
    up = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.stack(up, dim=-1).mean(dim=-1)


def z2_map(latents: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """gathierry/anomalib map in [0, 1]: mean over scales of upsampled `1 - exp(-0.5 * mean_c z^2)`."""
    return fuse(scale_maps("z2", latents, []), size)


def nll_map(latents: list[torch.Tensor], log_jacs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel negative log-likelihood per channel, averaged over scales after bilinear upsampling."""
    return fuse(scale_maps("nll", latents, log_jacs), size)


def anomaly_map(kind: str, latents: list[torch.Tensor], log_jacs: list[torch.Tensor],
                size: tuple[int, int]) -> torch.Tensor:
    return fuse(scale_maps(kind, latents, log_jacs), size)


def image_score(maps: torch.Tensor, mode: str = "max", topk_fraction: float = 0.01) -> torch.Tensor:
    """`(B,1,H,W) -> (B,)`: the map's max, the mean of its top `topk_fraction` of pixels, or its mean."""
    flat = maps.flatten(start_dim=1)
    if mode == "max":
        return flat.max(dim=1).values
    if mode == "topk":
        k = max(1, int(round(int(flat.shape[1]) * topk_fraction)))  # int(): traceable for export
        return flat.topk(k, dim=1).values.mean(dim=1)
    if mode == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"unknown image score '{mode}'; known: {', '.join(MAP_SCORES)}")
