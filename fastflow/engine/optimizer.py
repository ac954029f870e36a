"""The optimizer of the norms and flows and its learning-rate schedule (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math

import torch

from fastflow.core.model import FastFlow
from fastflow.runtime.config import RunConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, cosine: bool) -> float:
    """Linear warm-up, then constant or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: FastFlow, cfg: RunConfig, n_train: int):
    """Adam over the norms and flows, its learning-rate schedule (warm-up, then cosine over the whole run, stepped
    once per optimizer step) and the optimizer steps per epoch."""
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(n_train / cfg.train.batch_size) / cfg.train.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, steps_per_epoch * cfg.train.epochs, steps_per_epoch * cfg.train.warmup_epochs, cfg.train.cosine))
    return optimizer, scheduler, steps_per_epoch
