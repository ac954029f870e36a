"""Pictures for humans: heatmap grids and training curves (no I/O; callers save or log them)."""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """`(3,H,W)` in [0,1] -> `(H,W,3)` uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def colorize(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """`(...,H,W)` scores -> `(...,H,W,3)` uint8 through the jet colour map, scaled to [low, high]."""
    scaled = np.clip((maps - low) / max(high - low, 1e-12), 0, 1)
    return (plt.get_cmap("jet")(scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + heat * alpha).astype(np.uint8)


def heatmap_grid(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """One row per image: input | ground-truth mask | heatmap overlay; `-> (k*S, 3*S, 3)` uint8.

    All heatmaps share one colour scale (min..max over the grid), so rows are comparable.
    """
    scores = maps[:, 0].float().numpy()
    heat = colorize(scores, float(scores.min()), float(scores.max()))
    rows = []
    for image, mask, heat_row in zip(images, masks, heat):
        rgb = _to_uint8(image)
        mask_rgb = np.repeat((mask[0].float().numpy() * 255).astype(np.uint8)[..., None], 3, axis=2)
        rows.append(np.concatenate([rgb, mask_rgb, overlay(rgb, heat_row)], axis=1))
    return np.concatenate(rows, axis=0)


DECISION_COLOURS = {"hit": "darkgreen", "correct": "darkgreen", "miss": "firebrick", "false alarm": "firebrick"}


def decision(label: int, score: float, threshold: float) -> str:
    """What the stored threshold does with one image: hit, miss, false alarm or correct (flagged: score >= threshold)."""
    flagged = score >= threshold
    if int(label):
        return "hit" if flagged else "miss"
    return "false alarm" if flagged else "correct"


def _row_label(label: int, score: float, name: str, threshold: Optional[float]) -> tuple[str, str]:
    """The text left of a grid row (file, ground truth, score, decision) and its colour."""
    truth = "defective" if int(label) else "good"
    lines = [name] if name else []
    lines.append(f"{truth}, score {score:.3g}")
    if threshold is None:
        return "\n".join(lines), "firebrick" if int(label) else "black"
    verdict = decision(label, score, threshold)
    lines.append(f"{verdict} ({'>=' if score >= threshold else '<'} {threshold:.3g})")
    return "\n".join(lines), DECISION_COLOURS[verdict]


def labelled_heatmap_grid(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor, scores, labels,
                          title: str = "", cell_inches: float = 2.2, names: Optional[Sequence[str]] = None,
                          threshold: Optional[float] = None) -> np.ndarray:
    """`heatmap_grid` with words: column titles, each row's file (defect type/file name), ground truth, image score
    and, given the stored `threshold`, its decision (hit, miss, false alarm, correct); a colour bar of the maps'
    shared scale; a title line. `scores (k,)` image scores, `labels (k,)` 1 defective / 0 good;
    `-> (H, W, 3)` uint8 (about 220 px per cell)."""
    grid = heatmap_grid(images, masks, maps)
    rows, size = len(images), grid.shape[0] // max(len(images), 1)
    values = maps[:, 0].float().numpy()
    figure, axes = plt.subplots(rows, 3, figsize=(3 * cell_inches + 1.9, rows * cell_inches + 0.8), squeeze=False)
    for row in range(rows):
        for column, name in enumerate(("input", "ground-truth mask", "anomaly map (shared scale)")):
            axis = axes[row, column]
            axis.imshow(grid[row * size:(row + 1) * size, column * size:(column + 1) * size])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=10)
        text, colour = _row_label(labels[row], float(scores[row]), names[row] if names else "", threshold)
        axes[row, 0].set_ylabel(text, fontsize=9, color=colour)
    scale = plt.cm.ScalarMappable(matplotlib.colors.Normalize(float(values.min()), float(values.max())), cmap="jet")
    bar = figure.colorbar(scale, ax=axes[:, 2].tolist(), fraction=0.08, pad=0.03)
    bar.set_label("anomaly map value (pixel scale;\nnot the image score)", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.set_layout_engine("constrained")
    return figure_to_array(figure)


def close_figure(figure: plt.Figure) -> None:
    """Free a figure once it is saved (pyplot keeps every open figure)."""
    plt.close(figure)


def figure_to_array(figure: plt.Figure) -> np.ndarray:
    """Render and close a figure: `-> (H, W, 3)` uint8."""
    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


CURVES = (("eval/val_image_auroc", "val_image_auroc (leak-free)"), ("eval/image_auroc", "image_auroc (test set)"),
          ("eval/pixel_auroc", "pixel_auroc (test set)"), ("eval/aupro", "aupro (test set)"))


def curves_figure(history: list[dict[str, float]], best_epoch: Optional[int] = None, selection: str = "",
                  objective: str = "") -> plt.Figure:
    """AUROC/AUPRO per epoch (top) and loss (bottom), 700 px wide (it fits a run description on MLflow's Overview);
    the `objective` metric (e.g. `eval/val_image_auroc`) drawn first and bold, the chosen `best_epoch` marked on
    both (chosen by `selection`, a protocol name). Legends sit below the plots."""
    figure, (metric_axis, loss_axis) = plt.subplots(2, 1, figsize=(7, 7.2), height_ratios=(3, 2))
    for key, label in sorted(CURVES, key=lambda curve: curve[0] != objective):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            bold = key == objective
            metric_axis.plot(*zip(*points), marker="o", linewidth=2.6 if bold else 1.2,
                             label=f"{label}{' - objective' if bold else ''}", zorder=3 if bold else 2)
    metric_axis.set_title("evaluation")
    metric_axis.set_ylim(0, 1.02)
    epochs = [row["epoch"] for row in history]
    loss_axis.plot(epochs, [row["train/loss"] for row in history], label="train loss")
    val = [(row["epoch"], row["eval/val_loss"]) for row in history if "eval/val_loss" in row]
    if val:
        loss_axis.plot(*zip(*val), label="validation loss (held-out normals + synthetic anomalies)")
    loss_axis.set_title("loss")
    if best_epoch is not None:
        for axis in (metric_axis, loss_axis):
            axis.axvline(best_epoch, color="black", linestyle="--", linewidth=1,
                         label=f"chosen epoch {best_epoch}" + (f" ({selection})" if selection else ""))
    for axis in (metric_axis, loss_axis):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend(loc="upper left", bbox_to_anchor=(0, -0.13 if axis is metric_axis else -0.2), fontsize=8,
                    frameon=False)
    figure.set_layout_engine("constrained")
    return figure


def tidy_study_figure(name: str, axes, protocol_label: str, target: str) -> plt.Figure:
    """Optuna's matplotlib study figure (`optimization_history`, `param_importances`, `parallel_coordinate`) made
    readable: legends below the plot area naming the objective `target`, integer trial ticks, long parameter names
    on two lines, room for every label, and the selection protocol in a line above."""
    figure = axes.figure
    if name == "parallel_coordinate":
        names = [label.get_text() for label in axes.get_xticklabels()]
        figure.set_size_inches(max(10.0, 2.0 * len(names) + 2.5), 5.8)
        axes.set_xticks(axes.get_xticks(), [n.replace(".", ".\n", 1) if len(n) > 12 else n for n in names],
                        rotation=0, horizontalalignment="center", fontsize=9)
    else:
        figure.set_size_inches(10, 5.2)
        if name == "optimization_history":
            axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if axes.get_legend() is not None:
            handles, labels = axes.get_legend_handles_labels()
            labels = [target if name == "param_importances" else label for label in labels]
            axes.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False,
                        fontsize=9)
    figure.suptitle(f"selection protocol: {protocol_label}", fontsize=9, color="dimgray")
    # Optuna's parallel coordinates stack twin axes, which the constrained layout cannot solve
    figure.set_layout_engine("tight" if name == "parallel_coordinate" else "constrained")
    return figure
