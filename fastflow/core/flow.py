"""2D normalizing flows built from FrEIA's AllInOneBlock, with per-position log-Jacobians.

Stock FrEIA returns one log-det per sample. `PositionLogJacBlock` also keeps the log-det per
spatial position (summed over channels), so the per-pixel NLL anomaly map can include it. Summed
over positions it equals the block's own log-det (tested).
"""

from __future__ import annotations

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn


class PositionLogJacBlock(Fm.AllInOneBlock):
    """AllInOneBlock that records `position_log_jac` `(B, H, W)` on each forward pass."""

    position_log_jac: torch.Tensor

    def _affine(self, x, a, rev=False):
        # Same maths as FrEIA 0.2's AllInOneBlock._affine (non-GIN), keeping the channel sum per position.
        a = a * 0.1
        channels = x.shape[1]
        sub_jac = self.clamp * torch.tanh(a[:, :channels])
        self.position_log_jac = sub_jac.sum(dim=1)
        if not rev:
            return x * torch.exp(sub_jac) + a[:, channels:], sub_jac.sum(dim=self.sum_dims)
        self.position_log_jac = -self.position_log_jac
        return (x - a[:, channels:]) * torch.exp(-sub_jac), -sub_jac.sum(dim=self.sum_dims)

    def _permute(self, x, rev=False):
        # FrEIA applies its fixed channel shuffle as a 1x1 convolution with a CxC 0/1 matrix; indexing
        # is the same map (identical outputs, same state dict) at a fraction of the cost.
        if self.GIN or self.householder:
            return super()._permute(x, rev)
        scale = self.global_scale_activation(self.global_scale)
        log_jac = torch.sum(torch.log(scale))
        channels = self.in_channels
        if rev:
            inverse = self.w_perm_inv.view(channels, channels).argmax(dim=1)
            return (x[:, inverse] - self.global_offset) / scale, log_jac
        order = self.w_perm.view(channels, channels).argmax(dim=1)
        return (x * scale + self.global_offset)[:, order], log_jac

    def forward(self, x, c=[], rev=False, jac=True):
        out, log_jac_det = super().forward(x, c, rev, jac)
        # The global affine scaling adds sum_c log(scale_c) at every position; the permutation adds 0.
        global_term = torch.log(self.global_scale_activation(self.global_scale)).sum()
        self.position_log_jac = self.position_log_jac + (-1) ** rev * global_term
        return out, log_jac_det


def subnet_conv(kernel_size: int, hidden_ratio: float):
    """FrEIA subnet constructor: conv(k) -> ReLU -> conv(k), hidden = int(in_channels * ratio)."""

    def constructor(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        padding = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=padding),
        )

    return constructor


def build_flow(channels: int, height: int, width: int, flow_steps: int, conv3x3_only: bool,
               hidden_ratio: float, clamp: float) -> Ff.SequenceINN:
    """One 2D flow for features `(B, channels, height, width)`; kernels alternate 3x3/1x1 unless 3x3 only."""
    flow = Ff.SequenceINN(channels, height, width)
    for step in range(flow_steps):
        kernel_size = 1 if (step % 2 == 1 and not conv3x3_only) else 3
        flow.append(PositionLogJacBlock, subnet_constructor=subnet_conv(kernel_size, hidden_ratio),
                    affine_clamping=clamp, permute_soft=False)
    return flow


def run_flow(flow: Ff.SequenceINN, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B,C,H,W) -> (z (B,C,H,W), position_log_jac (B,H,W))`."""
    z, _ = flow(features)
    position_log_jac = sum(block.position_log_jac for block in flow.module_list)
    return z, position_log_jac
