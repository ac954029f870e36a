"""Image scores, held-out-normal map normalisation and the EMA of flow weights: constructed maps where the right
pixel/image must win, then tiny real runs of each option (checkpoint -> Predictor -> ONNX give the same scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.core.anomaly_map import image_score, scale_maps
from fastflow.core.ema import ema_decay, make_ema
from fastflow.core.scoring import (NormalStats, ScoreSettings, image_nll, nll_image_score, normal_stats, score,
                                   score_scales, standardise)
from fastflow.engine.train import train_and_evaluate
from fastflow.runtime.config import ConfigError
from fastflow.serve.export import export_predictor, run_exported
from fastflow.serve.inference import Predictor


def _maps(*values: float, size: int = 16) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()


def test_map_scores_pick_the_right_image() -> None:
    maps = torch.zeros(3, 1, 16, 16)
    maps[0, 0, 3, 4] = 10.0  # one hot pixel
    maps[1, 0, 4:8, 4:8] = 4.0  # a 16-pixel blob (6% of the image)
    maps[2] += 1.0  # raised everywhere
    assert image_score(maps, "max").argmax() == 0
    assert image_score(maps, "topk", topk_fraction=16 / 256).argmax() == 1
    assert image_score(maps, "mean").argmax() == 2
    assert image_score(maps, "topk", topk_fraction=16 / 256)[1] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown image score 'median'"):
        image_score(maps, "median")


def _normals(n: int = 40) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Held-out normal per-scale maps: scale 0 around 100 +- 10 with the border at +30, scale 1 around 0 +- 1."""
    g = torch.Generator().manual_seed(0)
    coarse = 100 + 10 * torch.randn(n, 1, 4, 4, generator=g)
    coarse[:, :, 0, :] += 30  # a border row that is high on every normal image (zero padding)
    fine = torch.randn(n, 1, 8, 8, generator=g)
    nll = torch.stack([100 + 10 * torch.randn(n, generator=g), torch.randn(n, generator=g)], dim=1)
    return [coarse, fine], nll


def test_scale_normalisation_lets_a_quiet_scale_win() -> None:
    maps, nll = _normals()
    stats = normal_stats(maps, nll)
    # image 0: normal, scale 0 one sd high; image 1: a 6-sd defect in the quiet scale 1 only
    coarse = torch.full((2, 1, 4, 4), 100.0)
    coarse[0, :, 1:3, 1:3] = 115.0
    fine = torch.zeros(2, 1, 8, 8)
    fine[1, :, 3:5, 3:5] = 6.0
    plain = torch.stack([m.amax(dim=(1, 2, 3)) for m in [coarse, fine]], 1).sum(1)
    assert plain.argmax() == 0  # raw values: the loud scale dominates
    scaled = standardise([coarse, fine], "scale", stats)
    assert scaled[0].mean() == pytest.approx(0.0, abs=0.5)  # 100 is about the normals' mean
    fused_max = torch.stack([m.amax(dim=(1, 2, 3)) for m in scaled], 1).amax(1)
    assert fused_max.argmax() == 1


def test_position_normalisation_discounts_the_border() -> None:
    maps, nll = _normals()
    stats = normal_stats(maps, nll)
    normal_image = maps[0][:1].clone()  # a held-out-like normal: its max is on the border row
    defect = torch.full((1, 1, 4, 4), 100.0)
    defect[:, :, 2, 2] = 125.0  # interior, 2.5 sd above
    both = torch.cat([normal_image.clamp(max=135), defect])
    assert both[0, 0].argmax() // 4 == 0 and both[0].max() > both[1].max()  # raw: the normal border wins
    for mode, winner in (("scale", 0), ("position", 1)):
        standardised = standardise([both], mode, stats)[0]
        assert int(standardised.amax(dim=(1, 2, 3)).argmax()) == winner, mode
    assert standardise([both], "none", stats)[0] is both
    with pytest.raises(ValueError, match="held-out normal images"):
        standardise([both], "scale", None)


def test_score_norm_standardises_the_score_but_not_the_map() -> None:
    maps, nll = _normals()
    # one scale, z2 kind: latents chosen so that the per-scale z2 map reproduces `both` from the border test
    normal_image = maps[0][:1].clamp(max=135)
    defect = torch.full((1, 1, 4, 4), 100.0)
    defect[:, :, 2, 2] = 125.0
    target = torch.cat([normal_image, defect]) / 200  # into (0, 1), the z2 map's range
    latents = [torch.sqrt(-2 * torch.log(1 - target))]  # 1 - exp(-0.5 z^2) = target
    single = normal_stats([m[:, :, :4, :4] / 200 for m in maps[:1]], nll[:, :1])
    raw_map, raw_score = score(latents, [], (4, 4), ScoreSettings("z2", "none", "max"), stats=single)
    fused, scores = score(latents, [], (4, 4), ScoreSettings("z2", "none", "max", score_norm="position"), stats=single)
    assert torch.allclose(fused, raw_map) and torch.allclose(raw_map, target, atol=1e-5)  # the map stays raw
    assert raw_score.argmax() == 0 and scores.argmax() == 1  # the score discounts the normal border


def test_score_map_reads_another_kind_of_map_than_the_output() -> None:
    """`score_map: z2` with an NLL output map: the map stays the NLL map, the score is the max of the
    position-standardised z2 map, and the held-out statistics are the z2 map's."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 4, 4, generator=g)]
    log_jacs = [torch.randn(6, 8, 8, generator=g), torch.randn(6, 4, 4, generator=g)]
    size = (8, 8)
    z2 = scale_maps("z2", latents, log_jacs)
    stats = normal_stats([m[:3] for m in z2], torch.zeros(3, 2))
    fused, scores = score(latents, log_jacs, size, ScoreSettings("nll", "none", "max", score_norm="position",
                                                                 score_map="z2"), stats=stats)
    nll_map, _ = score(latents, log_jacs, size, ScoreSettings("nll", "none", "max"))
    z2_map, z2_scores = score(latents, log_jacs, size, ScoreSettings("z2", "none", "max", score_norm="position"),
                              stats=stats)
    assert torch.allclose(fused, nll_map)  # the output map is the NLL map
    assert torch.allclose(scores, z2_scores)  # the score reads the standardised z2 map
    assert not torch.allclose(scores, score(latents, log_jacs, size, ScoreSettings("nll", "none", "max",
                                                                                  score_norm="position"),
                                            stats=stats)[1])
    with pytest.raises(ConfigError, match="model.map_norm='position' is invalid; expected none when model.score_map"):
        from fastflow.runtime.config import load_config
        load_config(None, ["model.anomaly_map=nll", "model.score_map=z2", "model.map_norm=position"])


def test_image_nll_and_its_scale_balanced_z_score() -> None:
    maps, nll = _normals()
    stats = normal_stats(maps, nll)
    # image 0: scale-0 NLL 1.5 sd high (typical of normals); image 1: scale-1 NLL 6 sd high
    images = torch.tensor([[115.0, 0.0], [100.0, 6.0]])
    assert nll_image_score(images, "nll", stats).argmax() == 0
    assert nll_image_score(images, "nll_z", stats).argmax() == 1
    with pytest.raises(ValueError, match="nll_z needs statistics"):
        nll_image_score(images, "nll_z", None)


def test_image_nll_is_the_flow_likelihood_per_dimension() -> None:
    z = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    z[0][1, :, 0, 0] = 2.0  # 0.5 * 3 * 4 = 6 on image 1, scale 0
    log_jacs = [torch.zeros(2, 4, 4), torch.full((2, 2, 2), 1.0)]
    nll = image_nll(z, log_jacs)
    assert nll[:, 0].tolist() == pytest.approx([0.0, 6.0 / 48])
    assert nll[:, 1].tolist() == pytest.approx([-4.0 / 20, -4.0 / 20])
    # the per-position map summed over positions is the image NLL times C*h*w / C
    per_position = scale_maps("nll", z, log_jacs)
    assert float(per_position[0][1].sum()) * 3 / 48 == pytest.approx(float(nll[1, 0]))


def test_normal_stats_round_trip_and_errors() -> None:
    maps, nll = _normals()
    stats = normal_stats(maps, nll)
    again = NormalStats.from_dict({k: v for k, v in stats.to_dict().items()})
    assert torch.equal(again.position_mean[0], stats.position_mean[0])
    assert stats.position_std[0].shape == (1, 1, 4, 4) and stats.nll_mean.shape == (2,)
    one = normal_stats([m[:1] for m in maps], nll[:1])  # one held-out image (val_fraction on a tiny category)
    assert all(bool(torch.isfinite(s).all()) for s in one.position_std + [one.nll_std])
    with pytest.raises(ValueError, match="at least 1 held-out normal image"):
        normal_stats([m[:0] for m in maps], nll[:0])
    with pytest.raises(ValueError, match="lack"):
        NormalStats.from_dict({"nll_mean": stats.nll_mean})


def test_ema_decay_halves_after_its_half_life_and_averages() -> None:
    decay = ema_decay(2.0, steps_per_epoch=7)
    assert decay ** 14 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="half-life"):
        ema_decay(0.0, 7)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_ema(model, 0.5)
    ema.update_parameters(model)  # first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)
    assert float(ema.module.weight.detach()) == pytest.approx(0.5)


class _IdentityFlow(torch.nn.Module):
    """Features are their own latents, with zero log-Jacobian: the statistics are then known in closed form."""

    def forward_features(self, features):
        return features, [torch.zeros(f.shape[0], *f.shape[2:]) for f in features]


def test_held_out_stats_use_only_the_normal_rows() -> None:
    from fastflow.data.features import EncodedSplit
    from fastflow.engine.evaluate import flow_outputs, held_out_stats
    from fastflow.runtime.config import RunConfig

    features = torch.ones(5, 2, 4, 4)
    features[3:] = 50.0  # the defective rows (label 1) are far off; they must not move the statistics
    split = EncodedSplit([features], torch.zeros(5, 1, 16, 16, dtype=torch.bool), torch.tensor([0, 0, 0, 1, 1]))
    cfg = RunConfig()
    for kind in ("z2", "nll"):
        outputs = flow_outputs(_IdentityFlow(), split, replace_model(cfg, anomaly_map=kind, topk_fraction=0.01),
                               torch.device("cpu"))
        stats = held_out_stats(outputs, split.labels)
        expected = scale_maps(kind, [features[:3]], [torch.zeros(3, 4, 4)])[0].mean()
        assert float(stats.scale_mean[0]) == pytest.approx(float(expected))
        assert float(stats.nll_mean[0]) == pytest.approx(0.5)  # 0.5 * z^2 per dimension, z = 1


def test_cross_fitted_scores_each_row_without_its_own_image() -> None:
    """Held-out normal 0 has a spike where the others are flat. With statistics that include it, the spike sets
    its own mean and std and hardly shows; left out, it scores as a new part with that spike would. Each
    anomalous copy is scored without its source image too."""
    from fastflow.core.scoring import cross_fitted

    g = torch.Generator().manual_seed(0)
    normals = 1.0 + 0.1 * torch.randn(6, 1, 8, 8, generator=g)
    normals[0, 0, 2, 2] = 4.0
    copies = normals.clone()
    copies[:, 0, 5, 5] += 3.0  # one anomalous copy of each normal
    per_scale = [torch.cat([normals, copies])]
    nll = torch.zeros(12, 1)
    normal, source = torch.arange(6), torch.arange(12) % 6
    size, settings = (8, 8), ScoreSettings(map_norm="none", image_score="max", score_norm="position")
    maps, scored, scores = cross_fitted(per_scale, nll, normal, source, size, settings)
    in_sample = score_scales(per_scale, nll, size, settings, stats=normal_stats([normals], nll[:6]))[2]
    assert scores[0] > 2 * in_sample[0]  # the spike, no longer hidden by its own statistics
    for row in (0, 3, 9):  # each row equals scoring it with the statistics of the other normals
        others = normal[normal != source[row]]
        expected = score_scales([per_scale[0][row:row + 1]], nll[row:row + 1], size, settings,
                                stats=normal_stats([normals[others]], nll[others]))[2]
        assert float(scores[row]) == pytest.approx(float(expected[0]))
    assert torch.equal(maps, per_scale[0])  # map_norm none: the output map is the raw map
    assert torch.equal(scored.flatten(1).max(dim=1).values, scores)  # the map the max score reads, returned with it
    with pytest.raises(ValueError, match="at least 2 held-out normal"):
        cross_fitted(per_scale, nll, normal[:1], torch.zeros(12, dtype=torch.long), size, settings)


def replace_model(cfg, **values):
    from fastflow.runtime.config import with_overrides
    return with_overrides(cfg, {"model": values})


# ---------------------------------------------------------------- tiny real runs


REAL = ("train.epochs=2", "train.batch_size=8", "model.flow_steps=2", "tracking.enabled=false",
        "eval.heatmap_images=0")


@pytest.mark.parametrize("options", [
    ("model.image_score=mean",),
    ("model.image_score=nll", "model.anomaly_map=z2"),
    ("model.image_score=nll_z",),
    ("model.map_norm=scale", "model.image_score=topk"),
    ("model.map_norm=position",),
    ("model.score_norm=position", "model.anomaly_map=nll"),
    ("model.score_norm=position", "model.anomaly_map=nll", "model.score_map=z2"),
    ("train.ema_halflife=1", "eval.weights=ema", "model.map_norm=scale"),
])
def test_tiny_run_per_option_scores_like_its_checkpoint(make_config, synthetic_root: Path, tmp_path: Path,
                                                        options) -> None:
    cfg = make_config(*REAL, *options)
    result = train_and_evaluate(cfg)
    for row in result.history:
        for key in ("eval/image_auroc", "eval/pixel_auroc", "eval/aupro", "eval/val_image_auroc"):
            assert 0.0 <= row[key] <= 1.0, key
    stored = result.checkpoint["normal_stats"]
    uses_stats = cfg.model.map_norm != "none" or cfg.model.score_norm == "position" or cfg.model.image_score == "nll_z"
    assert (stored is not None) == uses_stats
    if cfg.train.ema_halflife > 0:  # the unselected (raw) weights are logged alongside
        assert all(0.0 <= row["eval/raw_image_auroc"] <= 1.0 for row in result.history)
    # the Predictor rebuilt from the checkpoint scores the test images as evaluation did at the chosen epoch
    from fastflow.core.metrics import image_auroc
    from fastflow.data.dataset import ImageDataset, anomaly_spec, make_splits
    splits = make_splits(cfg.data, seed=cfg.train.seed)
    test = ImageDataset(splits.test, cfg.model.input_size)
    predictor = Predictor(result.checkpoint)
    test_scores = predictor.predict_tensor(torch.stack([test[i][0] for i in range(len(test))])).scores
    assert image_auroc(np.array([s.label for s in splits.test]), test_scores) == pytest.approx(
        result.checkpoint["metrics"]["eval/image_auroc"], abs=1e-6)
    # the stored range comes from the validation images (held-out normals + their synthetic anomalies); with
    # statistics they were scored leave-one-out, as a new part is (test_cross_fitted_* check that scoring)
    dataset = ImageDataset(splits.validation, cfg.model.input_size, anomaly_spec(cfg.data), seed=cfg.train.seed)
    predictions = predictor.predict_tensor(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    scores = predictions.scores
    if not uses_stats:
        assert [scores.min(), scores.max()] == pytest.approx(result.checkpoint["score_range"], rel=1e-4, abs=1e-4)
    if cfg.model.image_score == "max":  # predict's masks read the map the score reads: flagged iff a pixel is
        assert np.array_equal(predictions.is_anomalous, predictions.maps.max(axis=(1, 2)) >= predictor.threshold)
    if cfg.model.score_map != "output":  # the exported graph computes both kinds of map
        export_predictor(predictor, "onnx", tmp_path / "two_maps.onnx", check=False)
        images = torch.stack([test[i][0] for i in range(4)])
        with torch.no_grad():
            maps, scores = predictor(images)
        got_maps, got_scores = run_exported(tmp_path / "two_maps.onnx", "onnx", images.numpy())
        assert np.abs(got_maps - maps.numpy()).max() < 1e-3 * max(1.0, float(maps.abs().max()))
        assert np.abs(got_scores - scores.numpy()).max() < 1e-3 * max(1.0, float(scores.abs().max()))


def test_ema_alongside_raw_and_onnx_with_normal_stats(make_config, tmp_path: Path) -> None:
    cfg = make_config(*REAL, "train.ema_halflife=0.5", "model.map_norm=position", "model.image_score=nll_z")
    result = train_and_evaluate(cfg)
    assert all(0.0 <= row["eval/ema_image_auroc"] <= 1.0 for row in result.history)
    assert result.history[-1]["eval/ema_image_auroc"] != result.history[-1]["eval/image_auroc"] or \
        result.history[-1]["eval/ema_pixel_auroc"] != result.history[-1]["eval/pixel_auroc"]
    predictor = Predictor(result.checkpoint)
    out = tmp_path / "normalised.onnx"
    export_predictor(predictor, "onnx", out, check=False)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps, scores = predictor(images)
    got_maps, got_scores = run_exported(out, "onnx", images.numpy())
    assert np.abs(got_maps - maps.numpy()).max() < 1e-3 * max(1.0, float(maps.abs().max()))
    assert np.abs(got_scores - scores.numpy()).max() < 1e-3 * max(1.0, float(scores.abs().max()))


def test_options_that_need_held_out_normals_say_so(make_config, tiny_mvtec: Path) -> None:
    with pytest.raises(ConfigError, match="eval.weights='ema' is invalid"):
        make_config("eval.weights=ema")
    cfg = make_config(*REAL, f"data.root={tiny_mvtec.parent}", f"data.category={tiny_mvtec.name}",
                      "data.val_fraction=0", "model.map_norm=scale")  # no validation/good, nothing held out
    with pytest.raises(ValueError, match="model.map_norm=scale .* held-out normals"):
        train_and_evaluate(cfg)
    state = train_and_evaluate(make_config(*REAL, "train.epochs=1")).checkpoint
    state["config"]["model"]["map_norm"] = "position"
    with pytest.raises(ValueError, match="no held-out normal statistics"):
        Predictor(state)


def test_offline_space_combinations_are_valid_configs() -> None:
    """Every combination of the offline space's categorical choices (the new options included) is a valid run."""
    import itertools

    from fastflow.study.space import load_space

    repo = Path(__file__).resolve().parents[2]
    space = load_space(repo / "sweeps" / "offline.yaml")
    assert {"model.image_score", "model.score_map", "eval.weights"} <= set(space.params)
    names = [n for n, d in space.params.items() if d.kind == "categorical"]
    fixed = {n: d.low for n, d in space.params.items() if d.kind != "categorical"}
    fixed = {n: int(v) if space.params[n].kind == "int" else v for n, v in fixed.items()}
    for values in itertools.product(*(space.params[n].choices for n in names)):
        cfg = space.trial_config({**fixed, **dict(zip(names, values))}, "tire", "data")
        assert cfg.eval.weights == "raw" or cfg.train.ema_halflife > 0


@pytest.mark.parametrize("image_mode", ["max", "topk", "mean"])
def test_off_defect_scores_tell_a_detected_defect_from_a_difference_off_the_defects(image_mode) -> None:
    """Defective images whose score comes from a bump inside their mask: left out, they score as normals do
    (off-defect AUROC near 0.5). Defective images that are brighter everywhere but inside their mask score as
    high with the defect left out (off-defect AUROC stays at the image AUROC): the score ranks something else."""
    from fastflow.core.metrics import image_auroc
    from fastflow.core.scoring import off_defect_scores

    g = torch.Generator().manual_seed(0)
    n, size = 40, 32
    labels = np.array([0] * n + [1] * n)
    masks = torch.zeros(2 * n, 1, size, size, dtype=torch.bool)
    masks[n:, :, 10:14, 12:16] = True
    normal = torch.randn(n, 1, size, size, generator=g)
    bumped = torch.randn(n, 1, size, size, generator=g) + 6.0 * masks[n:].float()
    brighter = torch.randn(n, 1, size, size, generator=g) + 1.5
    for defective, expected_off in ((bumped, (0.3, 0.7)), (brighter, (0.95, 1.0))):
        maps = torch.cat([normal, defective])
        on = image_score(maps, image_mode, topk_fraction=0.02)
        settings = ScoreSettings(image_score=image_mode, topk_fraction=0.02)
        off = off_defect_scores(maps, masks, settings, margin=2 / size)
        assert image_auroc(labels, on.numpy()) > 0.95
        assert expected_off[0] <= image_auroc(labels, off.numpy()) <= expected_off[1]
        assert torch.equal(off[:n], on[:n])  # images without a defect keep their score
    # a whole-image likelihood leaves nothing out
    assert off_defect_scores(maps, masks, ScoreSettings(image_score="nll_z")) is None
