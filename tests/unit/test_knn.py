"""The kNN feature reference's maths (fastflow.core.knn): patches, bank, nearest distances, maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastflow.core.knn import (KnnRecipe, gaussian_blur, knn_maps, local_average, memory_bank, nearest_distances,
                               patch_features, reference_stages)
from fastflow.runtime.config import ConfigError, load_config


def test_nearest_distances_match_a_brute_force_search() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 6, generator=generator).numpy()
    patches = torch.randn(3, 6, 4, 5, generator=generator)  # (N, D, h, w)
    found = nearest_distances(bank, patches)
    rows = patches.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    expected = np.sqrt(((rows[:, None, :] - bank[None]) ** 2).sum(-1)).min(axis=1).reshape(3, 4, 5)
    assert found.shape == (3, 1, 4, 5)
    np.testing.assert_allclose(found[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_patch_seen_in_training_scores_zero_and_a_new_one_its_distance() -> None:
    train = [torch.zeros(2, 3, 4, 4)]
    train[0][1, :, 2, 2] = 1.0  # one training patch differs
    test = [torch.zeros(1, 3, 4, 4)]
    test[0][0, :, 0, 0] = 3.0  # a patch far from every training patch: distance sqrt(3 * 2**2) to (1,1,1)
    recipe = KnnRecipe(pool=1, min_stride=1, bank_fraction=1.0, sigma=0.0)
    maps, scores = knn_maps(train, test, [8], (4, 4), recipe)
    assert maps[0, 0, 3, 3].item() == pytest.approx(0.0, abs=1e-6)
    assert scores[0].item() == pytest.approx(np.sqrt(12.0), rel=1e-5)


def test_bank_is_a_bounded_random_subset_of_the_training_patches() -> None:
    patches = torch.arange(2 * 2 * 10 * 10, dtype=torch.float32).view(2, 2, 10, 10)
    bank = memory_bank(patches, KnnRecipe(bank_fraction=0.25, bank_max=30))
    assert bank.shape == (30, 2)  # a quarter would be 50 patches: bounded at 30
    rows = {tuple(r) for r in patches.permute(0, 2, 3, 1).reshape(-1, 2).numpy().tolist()}
    assert {tuple(r) for r in bank.tolist()} <= rows and len({tuple(r) for r in bank.tolist()}) == 30
    again = memory_bank(patches, KnnRecipe(bank_fraction=0.25, bank_max=30))
    np.testing.assert_array_equal(bank, again)  # deterministic in the recipe's seed


def test_patches_average_neighbours_and_join_the_mid_level_stages() -> None:
    fine, coarse = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)
    assert reference_stages([4, 8, 16], 8) == [1, 2] and reference_stages([16], 32) == [0]
    patches = patch_features([torch.randn(1, 2, 16, 16), fine, coarse], [1, 2], pool=3)
    assert patches.shape == (1, 10, 8, 8)
    averaged = local_average(fine, 3)
    assert averaged[0, :, 4, 4].numpy() == pytest.approx(fine[0, :, 3:6, 3:6].mean(dim=(1, 2)).numpy(), rel=1e-5)
    assert averaged[0, :, 0, 0].numpy() == pytest.approx(fine[0, :, 0:2, 0:2].mean(dim=(1, 2)).numpy(), rel=1e-5)
    assert torch.equal(local_average(fine, 1), fine)


def test_blur_keeps_a_constant_map_and_spreads_a_peak() -> None:
    constant = torch.full((1, 1, 20, 20), 2.0)
    assert torch.allclose(gaussian_blur(constant, 4.0), constant)
    peak = torch.zeros(1, 1, 41, 41)
    peak[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-4) and blurred.max().item() < 0.1
    assert blurred[0, 0, 20, 20] == blurred.max()


def test_feature_pool_must_be_an_odd_neighbourhood() -> None:
    assert load_config(None, ["model.feature_pool=3"]).model.feature_pool == 3
    with pytest.raises(ConfigError, match="model.feature_pool=2 is invalid; expected an odd number"):
        load_config(None, ["model.feature_pool=2"])


def test_alignment_tells_aligned_parts_from_parts_anywhere() -> None:
    from fastflow.core.alignment import ALIGNED, alignment, feature_norm_for

    generator = torch.Generator().manual_seed(0)
    layout = torch.randn(1, 8, 6, 6, generator=generator)  # the same part at the same place in every image
    aligned = layout + 0.3 * torch.randn(40, 8, 6, 6, generator=generator)
    anywhere = torch.stack([torch.roll(image, shifts=(int(dy), int(dx)), dims=(1, 2)) for image, dy, dx in
                            zip(aligned, torch.randint(0, 6, (40,), generator=generator),
                                torch.randint(0, 6, (40,), generator=generator))])
    assert alignment([aligned]) > 0.8 > ALIGNED > 0.2 > alignment([anywhere])
    assert feature_norm_for([aligned])[0] == "chw" and feature_norm_for([anywhere])[0] == "channel"
