"""Negative log-likelihood of the flow outputs under a standard normal."""

from __future__ import annotations

import torch


def nll_loss(latents: list[torch.Tensor], log_jacs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of sum over scales of `0.5*||z||^2 - log|det J|` (gathierry's loss).

    latents: `[(B,C,h,w)]`; log_jacs: per-position `[(B,h,w)]`, summed here to per-sample log-dets.
    """
    loss = latents[0].new_zeros(())
    for z, log_jac in zip(latents, log_jacs):
        loss = loss + torch.mean(0.5 * torch.sum(z.float() ** 2, dim=(1, 2, 3)) - log_jac.float().sum(dim=(1, 2)))
    return loss
