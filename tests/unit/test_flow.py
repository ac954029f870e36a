"""Tests for fastflow.flow, fastflow.loss and fastflow.anomaly_map (maths only, tiny tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastflow.core.anomaly_map import anomaly_map, image_score, nll_map, z2_map
from fastflow.core.flow import PositionLogJacBlock, build_flow, run_flow
from fastflow.core.loss import nll_loss
from fastflow.core.model import FastFlow, count_parameters
from fastflow.runtime.config import ModelConfig


def _random_flow(channels: int, height: int, width: int, steps: int, conv3x3_only: bool, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
    """A flow whose parameters are all moved off their initial values (non-trivial coupling and scaling)."""
    torch.manual_seed(seed)
    flow = build_flow(channels, height, width, steps, conv3x3_only, hidden_ratio=1.0, clamp=2.0).to(dtype)
    with torch.no_grad():
        for name, parameter in flow.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * (0.5 if "global" in name else 0.3))
    return flow


@pytest.mark.parametrize("conv3x3_only", [True, False])
def test_position_log_jac_sums_to_freia_log_det(conv3x3_only: bool) -> None:
    flow = _random_flow(8, 5, 6, steps=4, conv3x3_only=conv3x3_only)
    kernels = [block.subnet[0].kernel_size for block in flow.module_list]
    assert kernels == ([(3, 3)] * 4 if conv3x3_only else [(3, 3), (1, 1), (3, 3), (1, 1)])
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    z_ref, log_det_ref = flow(x)  # stock FrEIA SequenceINN: one log-det per sample
    z, position_log_jac = run_flow(flow, x)
    assert position_log_jac.shape == (3, 5, 6)
    assert torch.allclose(z, z_ref)
    assert torch.allclose(position_log_jac.sum(dim=(1, 2)), log_det_ref, rtol=1e-10, atol=1e-9)
    assert log_det_ref.abs().min() > 1.0  # the flow really scales; the check is not 0 == 0
    # per block, too
    for block in flow.module_list:
        assert isinstance(block, PositionLogJacBlock)
        (_, ), block_log_det = block((x,))
        assert torch.allclose(block.position_log_jac.sum(dim=(1, 2)), block_log_det, atol=1e-9)


@pytest.mark.parametrize("conv3x3_only", [True, False])
def test_inverse_undoes_forward(conv3x3_only: bool) -> None:
    flow = _random_flow(6, 4, 4, steps=3, conv3x3_only=conv3x3_only, seed=1)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    z, log_det = flow(x)
    forward_positions = sum(block.position_log_jac for block in flow.module_list)
    x_back, log_det_back = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(log_det_back, -log_det, atol=1e-9)
    reverse_positions = sum(block.position_log_jac for block in flow.module_list)
    assert torch.allclose(reverse_positions, -forward_positions, atol=1e-9)
    assert not torch.allclose(z, x)


@pytest.mark.parametrize("conv3x3_only", [True, False])
def test_log_det_matches_autograd_jacobian(conv3x3_only: bool) -> None:
    channels, height, width = 4, 3, 3
    flow = _random_flow(channels, height, width, steps=2, conv3x3_only=conv3x3_only, seed=2)
    x = torch.randn(1, channels, height, width, dtype=torch.float64)

    def f(flat: torch.Tensor) -> torch.Tensor:
        return flow(flat.view(1, channels, height, width))[0].flatten()

    jacobian = torch.autograd.functional.jacobian(f, x.flatten())
    assert jacobian.shape == (36, 36)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    _, log_det = flow(x)
    _, position_log_jac = run_flow(flow, x)
    assert log_det.item() == pytest.approx(log_abs_det.item(), abs=1e-8)
    assert position_log_jac.sum().item() == pytest.approx(log_abs_det.item(), abs=1e-8)


def _expected_flow_parameters(channels: list[int], steps: int, conv3x3_only: bool) -> int:
    """AllInOneBlock with subnet conv(k, C/2 -> C/2) -> ReLU -> conv(k, C/2 -> C), plus global scale+offset."""
    total = 0
    for c in channels:
        for step in range(steps):
            k = 1 if (step % 2 == 1 and not conv3x3_only) else 3
            half = c // 2
            total += (half * half * k * k + half) + (half * c * k * k + c) + 2 * c
    return total


@pytest.mark.parametrize("conv3x3_only, paper", [(True, 4.66e6), (False, 2.7e6)])
def test_resnet18_preset_flow_parameter_count(conv3x3_only: bool, paper: float) -> None:
    cfg = ModelConfig(backbone="resnet18", weights="none", input_size=256, feature_indices=(1, 2, 3),
                      flow_steps=8, conv3x3_only=conv3x3_only, hidden_ratio=1.0)
    model = FastFlow(cfg)
    count = count_parameters(model.flows)
    assert count == _expected_flow_parameters([64, 128, 256], 8, conv3x3_only)
    # 4.66M: gathierry's FastFlow with FrEIA (REFERENCE.md; the paper says 4.9M); 2.7M: paper, alternating
    assert count == pytest.approx(paper, rel=0.02 if conv3x3_only else 0.05)
    assert count_parameters(model.backbone) == 0  # frozen


def test_loss_decreases_on_fixed_features() -> None:
    torch.manual_seed(0)
    flows = torch.nn.ModuleList([build_flow(8, 6, 6, 2, True, 1.0, 2.0), build_flow(16, 3, 3, 2, True, 1.0, 2.0)])
    features = [torch.randn(8, 8, 6, 6) * 2 + 1, torch.randn(8, 16, 3, 3) * 3 - 1]
    optimizer = torch.optim.Adam(flows.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        outputs = [run_flow(flow, feature) for flow, feature in zip(flows, features)]
        loss = nll_loss([z for z, _ in outputs], [j for _, j in outputs])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 20  # mostly monotone


def test_nll_loss_formula() -> None:
    z = [torch.full((2, 3, 2, 2), 2.0), torch.ones(2, 1, 1, 1)]
    log_jacs = [torch.full((2, 2, 2), 0.5), torch.tensor([[[1.0]], [[3.0]]])]
    # scale 1: 0.5*12*4 - 4*0.5 = 22; scale 2: 0.5 - (1 or 3) -> mean -1.5
    assert nll_loss(z, log_jacs).item() == pytest.approx(22 - 1.5)


def test_map_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    latents = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    log_jacs = [torch.randn(2, 16, 16), torch.randn(2, 8, 8), torch.randn(2, 4, 4)]
    for kind in ("z2", "nll"):
        maps = anomaly_map(kind, latents, log_jacs, (64, 64))
        assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()
    z2 = z2_map(latents, (64, 64))
    assert 0.0 <= z2.min() and z2.max() <= 1.0
    assert torch.allclose(z2_map([torch.zeros(1, 4, 2, 2)], (8, 8)), torch.zeros(1, 1, 8, 8))  # z = 0: normal
    with pytest.raises(ValueError, match="unknown anomaly map 'heat'"):
        anomaly_map("heat", latents, log_jacs, (64, 64))


def test_maps_by_hand_on_one_scale() -> None:
    z = torch.zeros(1, 2, 2, 2)
    z[0, :, 1, 1] = torch.tensor([2.0, 0.0])  # one unusual position
    log_jac = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    z2 = z2_map([z], (2, 2))
    assert torch.allclose(z2[0, 0], torch.tensor([[0.0, 0.0], [0.0, 1 - torch.exp(torch.tensor(-1.0))]]))
    nll = nll_map([z], [log_jac], (2, 2))
    assert torch.allclose(nll[0, 0], torch.tensor([[0.0, 0.0], [0.0, (0.5 * 4 - 1.0) / 2]]))
    # upsampling keeps the peak where it was
    big = nll_map([z], [log_jac], (8, 8))
    assert big.shape == (1, 1, 8, 8) and big[0, 0, -1, -1] == big.max() and big[0, 0, 0, 0] == 0
    assert torch.allclose(big, F.interpolate(nll, (8, 8), mode="bilinear", align_corners=False))


def test_image_score_max_and_topk() -> None:
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0].view(-1)[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    maps[1, 0, 3, 3] = 7.0
    assert torch.equal(image_score(maps, "max"), torch.tensor([5.0, 7.0]))
    top5 = image_score(maps, "topk", topk_fraction=0.05)  # k = 5 of 100 pixels
    assert torch.allclose(top5, torch.tensor([3.0, 7.0 / 5]))
    assert torch.allclose(image_score(maps, "topk", topk_fraction=0.001), torch.tensor([5.0, 7.0]))  # k >= 1
    assert torch.allclose(image_score(maps, "topk", topk_fraction=1.0), maps.flatten(1).mean(1))
    assert torch.allclose(image_score(maps, "mean"), torch.tensor([15.0 / 100, 7.0 / 100]))
    with pytest.raises(ValueError, match="unknown image score"):
        image_score(maps, "median")


def test_fastflow_forward_shapes() -> None:
    cfg = ModelConfig(backbone="resnet18", weights="none", input_size=64, flow_steps=2)
    model = FastFlow(cfg).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latents, log_jacs = model(images)
    assert [tuple(z.shape) for z in latents] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [tuple(j.shape) for j in log_jacs] == [(2, 16, 16), (2, 8, 8), (2, 4, 4)]
    # forward == forward_features on the extracted features; LayerNorm sits before each flow
    with torch.no_grad():
        again, _ = model.forward_features(model.extract_features(images))
    assert all(torch.allclose(a, b) for a, b in zip(latents, again))
    assert all(isinstance(norm, torch.nn.LayerNorm) for norm in model.norms)


@pytest.mark.parametrize("rev", [False, True])
def test_indexed_permutation_matches_freia_convolution(rev: bool) -> None:
    """PositionLogJacBlock shuffles channels by index; FrEIA's own block by a 1x1 convolution."""
    import FrEIA.modules as Fm

    from fastflow.core.flow import PositionLogJacBlock, subnet_conv

    torch.manual_seed(0)
    ours = PositionLogJacBlock([(6, 5, 4)], subnet_constructor=subnet_conv(3, 1.0), affine_clamping=2.0,
                               permute_soft=False)
    stock = Fm.AllInOneBlock([(6, 5, 4)], subnet_constructor=subnet_conv(3, 1.0), affine_clamping=2.0,
                             permute_soft=False)
    stock.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.global_offset.normal_()
        stock.global_offset.copy_(ours.global_offset)
    x = torch.randn(2, 6, 5, 4)
    (out_ours,), jac_ours = ours((x,), rev=rev)
    (out_stock,), jac_stock = stock((x,), rev=rev)
    assert torch.allclose(out_ours, out_stock, atol=1e-6)
    assert torch.allclose(jac_ours, jac_stock, atol=1e-5)
