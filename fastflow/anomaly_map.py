"""Anomaly maps from flow outputs, and the image score."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def z2_map(latents: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """gathierry/anomalib map: mean over scales of upsampled `-exp(-0.5 * mean_c z^2)`; `-> (B,1,H,W)`.

    Shifted by +1 so that it lies in [0, 1] (monotone, so AUROCs are unchanged).
    """
    maps = [F.interpolate(-torch.exp(-0.5 * torch.mean(z.float() ** 2, dim=1, keepdim=True)), size=size,
                          mode="bilinear", align_corners=False) for z in latents]
    return 1.0 + torch.stack(maps, dim=-1).mean(dim=-1)


def nll_map(latents: list[torch.Tensor], log_jacs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel negative log-likelihood `0.5*sum_c z^2 - sum_blocks logdet(h,w)`, per channel, averaged over
    scales after bilinear upsampling; `-> (B,1,H,W)`. Dividing by C puts scales of different widths on par."""
    maps = []
    for z, log_jac in zip(latents, log_jacs):
        per_position = (0.5 * torch.sum(z.float() ** 2, dim=1) - log_jac.float()) / z.shape[1]
        maps.append(F.interpolate(per_position.unsqueeze(1), size=size, mode="bilinear", align_corners=False))
    return torch.stack(maps, dim=-1).mean(dim=-1)


def anomaly_map(kind: str, latents: list[torch.Tensor], log_jacs: list[torch.Tensor],
                size: tuple[int, int]) -> torch.Tensor:
    if kind == "z2":
        return z2_map(latents, size)
    if kind == "nll":
        return nll_map(latents, log_jacs, size)
    raise ValueError(f"unknown anomaly map '{kind}'; known: z2, nll")


def image_score(maps: torch.Tensor, mode: str = "max", topk_fraction: float = 0.01) -> torch.Tensor:
    """`(B,1,H,W) -> (B,)`: the map's max, or the mean of its top `topk_fraction` of pixels."""
    flat = maps.flatten(start_dim=1)
    if mode == "max":
        return flat.max(dim=1).values
    if mode == "topk":
        k = max(1, int(round(int(flat.shape[1]) * topk_fraction)))  # int(): traceable for export
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score '{mode}'; known: max, topk")
