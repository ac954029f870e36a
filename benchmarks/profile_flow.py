"""Where a FastFlow training epoch spends its time (used by benchmark.py; CPU or CUDA).

Times are CPU seconds on the CPU (wall seconds on CUDA).
- `epoch_phases`: one epoch of the uncached path (feature_cache=off), timed by phase: image loading and
  decoding, backbone, flow forward (LayerNorm + flows), loss, backward, optimizer step. It runs the real
  `fastflow.engine.train.train_epoch` with timers around what the epoch calls.
- `top_ops`: torch.profiler over one training step on cached features, self time per operator.
- `permutation_whatif`: a flow training step with FrEIA's hard channel permutation done as it is now (a
  1x1 conv with a CxC permutation matrix, forward and backward) and as channel indexing, same results.
  The patch only lives inside the `with` block of this process; fastflow/ is not changed.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from unittest.mock import patch

import torch
from torch.utils.data import DataLoader

from fastflow.core.flow import PositionLogJacBlock
from fastflow.core.loss import nll_loss
from fastflow.core.model import FastFlow
from fastflow.data.dataset import ImageDataset, make_splits
from fastflow.engine import train
from fastflow.engine.optimizer import make_optimizer
from fastflow.engine.train import seed_everything
from fastflow.runtime.config import RunConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device):
    """CPU seconds on the CPU (robust to other jobs on a shared machine), wall seconds on CUDA."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def epoch_phases(cfg: RunConfig, device: torch.device) -> tuple[dict[str, float], list[torch.Tensor], FastFlow]:
    """Seconds per phase of one uncached epoch of the real `train_epoch`; also the last batch's features and the
    model. The phases are timed around what the epoch calls: the batches it is given (image loading, backbone),
    the model's flow forward, the loss and the optimizer step (the time before the step is the backward)."""
    seed_everything(cfg.train.seed)
    model = FastFlow(cfg.model).to(device)
    splits = make_splits(cfg.data, cfg.train.max_train_images, cfg.train.seed)
    loader = DataLoader(ImageDataset(splits.train, cfg.model.input_size), batch_size=cfg.train.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(cfg.train.seed))
    optimizer, scheduler, _ = make_optimizer(model, cfg, len(splits.train))
    phases: dict[str, float] = defaultdict(float)
    now_fn = _clock(device)
    clock = now_fn()

    def lap(name: str) -> None:
        nonlocal clock
        _sync(device)
        now = now_fn()
        phases[name] += now - clock
        clock = now

    def timed(function, name: str):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            lap(name)
            return result
        return call

    features: list[torch.Tensor] = []

    def batches():
        for images, _, _ in loader:
            images = images.to(device)
            lap("load + decode + resize images")
            features[:] = model.extract_features(images)
            lap("backbone forward")
            yield features

    model.forward_features = timed(model.forward_features, "flow forward (LayerNorm + flows)")
    optimizer.register_step_pre_hook(lambda *_: lap("backward"))
    optimizer.register_step_post_hook(lambda *_: lap("optimizer step"))
    try:
        with patch.object(train, "nll_loss", timed(nll_loss, "loss")):
            train.train_epoch(model, batches(), optimizer, scheduler, cfg, device, epoch=1)
    finally:
        del model.forward_features  # the class's method again
    return dict(phases), [f.detach() for f in features], model


def top_ops(model: FastFlow, features: list[torch.Tensor], rows: int = 8) -> tuple[list[tuple[str, float]], float]:
    """(operator, self seconds) of one training step on cached features, largest first; and the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if features[0].is_cuda else [])
    _train_step(model, features)  # warm-up
    with profile(activities=activities) as prof:
        _train_step(model, features)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e6) for e in events[:rows]], total


def _train_step(model: FastFlow, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward + backward (gradients discarded, parameters unchanged)."""
    model.train()
    latents, log_jacs = model.forward_features(features)
    nll_loss(latents, log_jacs).backward()
    model.zero_grad(set_to_none=True)
    _sync(features[0].device)
    return latents, log_jacs


@contextmanager
def index_permutation():
    """Inside the block, PositionLogJacBlock permutes channels by indexing instead of a 1x1 conv."""
    original = PositionLogJacBlock._permute

    def _permute(self, x, rev=False):
        if rev or self.GIN or self.householder:
            return original(self, x, rev)
        order = self.w_perm.flatten(1).argmax(dim=1)  # conv2d(x, w)[:, i] = x[:, j] where w[i, j] = 1
        scale = self.global_scale_activation(self.global_scale)
        return (x * scale + self.global_offset)[:, order], torch.sum(torch.log(scale))

    PositionLogJacBlock._permute = _permute
    try:
        yield
    finally:
        PositionLogJacBlock._permute = original


def permutation_whatif(model: FastFlow, features: list[torch.Tensor], repeats: int = 2) -> dict[str, float]:
    """Median seconds of a flow forward+backward step, stock vs index permutation, and the output difference."""
    now = _clock(features[0].device)

    def timed() -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        _train_step(model, features)  # warm-up
        times = []
        for _ in range(repeats):
            start = now()
            latents, log_jacs = _train_step(model, features)
            times.append(now() - start)
        return statistics.median(times), latents, log_jacs

    stock, z_stock, j_stock = timed()
    with index_permutation():
        indexed, z_index, j_index = timed()
    difference = max([(a - b).abs().max().item() for a, b in zip(z_stock, z_index)]
                     + [(a - b).abs().max().item() for a, b in zip(j_stock, j_index)])
    return {"stock_s": stock, "index_s": indexed, "speedup": stock / indexed, "max_abs_diff": difference,
            "batch": features[0].shape[0]}


def random_features(model: FastFlow, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Random backbone-shaped features `[(B,C_i,h_i,w_i)]` for a flow-only measurement."""
    size = model.cfg.input_size
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size // s, size // s, generator=generator).to(device)
            for c, s in zip(model.backbone.channels, model.backbone.strides)]
