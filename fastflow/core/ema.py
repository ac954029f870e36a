"""Exponential moving average of the flow weights (torch's `AveragedModel`), with the decay set by a half-life
in epochs so that it means the same for a category of 60 or of 400 training images."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(halflife_epochs: float, steps_per_epoch: int) -> float:
    """Per-optimizer-step decay whose weight halves after `halflife_epochs` epochs."""
    if halflife_epochs <= 0 or steps_per_epoch < 1:
        raise ValueError(f"ema half-life must be > 0 epochs (got {halflife_epochs}) and steps per epoch >= 1 "
                         f"(got {steps_per_epoch})")
    return 0.5 ** (1.0 / (halflife_epochs * steps_per_epoch))


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (parameters and buffers); call `.update_parameters(model)` after each step and
    evaluate `.module`."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


__all__ = ["ema_decay", "make_ema"]
