"""Figures for the prep summary, training runs and the model comparison: one PNG per function, path returned.

Figures are built as `matplotlib.figure.Figure` objects and rendered by the Agg canvas, never
through pyplot: pyplot keeps a global registry of open figures (a leak in long-lived Ray workers
unless every one is closed) and may pick an interactive backend. A bare Figure needs neither a
display nor a close; it is freed when the function returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import calibration_curve

CLASS_NAMES = ("Female", "Male")
DPI = 120


@contextlib.contextmanager
def _figure(path: str | Path, *, ncols: int = 1, size: tuple[float, float] = (6.4, 4.4)) -> Iterator[list[Axes]]:
    """Yield a row of `ncols` axes; on a clean exit save the figure to `path` as PNG."""
    fig = Figure(figsize=size, layout="constrained")
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    yield axes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")


def _epoch_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5" ticks
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _per_epoch(history: pd.DataFrame, path: str | Path, columns: Mapping[str, str], ylabel: str) -> Path:
    missing = {"epoch", *columns} - set(history.columns)
    if missing:
        raise ValueError(f"history lacks column(s) {sorted(missing)}")
    with _figure(path) as (ax,):
        for column, label in columns.items():
            ax.plot(history["epoch"], history[column], marker="o", label=label)
        _epoch_axis(ax)
        ax.set(ylabel=ylabel, title=f"{ylabel} per epoch")
        ax.legend()
    return Path(path)


def plot_accuracy_per_epoch(history: pd.DataFrame, path: str | Path) -> Path:
    """Train and validation accuracy per epoch (columns epoch, train_acc, val_acc)."""
    return _per_epoch(history, path, {"train_acc": "train", "val_acc": "validation"}, "accuracy")


def plot_loss_per_epoch(history: pd.DataFrame, path: str | Path) -> Path:
    """Train and validation loss per epoch (columns epoch, train_loss, val_loss)."""
    return _per_epoch(history, path, {"train_loss": "train", "val_loss": "validation"}, "loss")


def _draw_confusion(ax: Axes, cm: Any, class_names: Sequence[str], title: str | None) -> None:
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {class_names}")
    # Row-normalised: each cell is the share of that *true* class, i.e. per-class recall on the
    # diagonal, which stays readable when the classes are imbalanced. Drawn here rather than with
    # sklearn's ConfusionMatrixDisplay, which writes either the counts or the shares in a cell, not both.
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if shares[row, col] > 0.5 else "black"
        ax.text(col, row, f"{count:,}\n{shares[row, col]:.1%}", ha="center", va="center", color=colour)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")


def plot_confusion_matrix(
    cm: Any,
    path: str | Path,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
) -> Path:
    """One confusion matrix (rows = true class) with counts and row percentages in the cells."""
    with _figure(path, size=(4.8, 4.4)) as (ax,):
        _draw_confusion(ax, cm, class_names, title)
    return Path(path)


def plot_confusion_matrices(
    named_cms: Mapping[str, Any], path: str | Path, *, class_names: Sequence[str] = CLASS_NAMES
) -> Path:
    """Several models' confusion matrices side by side, titled by model name."""
    if not named_cms:
        raise ValueError("no confusion matrices to plot")
    with _figure(path, ncols=len(named_cms), size=(4.2 * len(named_cms), 4.4)) as axes:
        for ax, (name, cm) in zip(axes, named_cms.items(), strict=True):
            _draw_confusion(ax, cm, class_names, name)
    return Path(path)


def plot_class_distribution(
    counts: Mapping[str, Mapping[str, int]],
    path: str | Path,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Grouped bars of class counts per split, e.g. {"train": {"Female": n, "Male": m}, ...}."""
    splits = list(counts)
    width = 0.8 / len(class_names)
    with _figure(path) as (ax,):
        for i, name in enumerate(class_names):
            positions = np.arange(len(splits)) + (i - (len(class_names) - 1) / 2) * width
            bars = ax.bar(positions, [counts[s].get(name, 0) for s in splits], width, label=name)
            ax.bar_label(bars, fmt="{:,.0f}", padding=2)
        ax.set_xticks(range(len(splits)), splits)
        ax.set(ylabel="images", title="class distribution per split")
        ax.margins(y=0.12)  # headroom for the numbers on the tallest bars
        ax.legend()
    return Path(path)


def plot_accuracy_with_ci(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, xlabel: str = "test accuracy (95% Wilson CI)"
) -> Path:
    """Horizontal bars of test accuracy with 95% CI error bars, best model on top.

    Each row needs keys model, accuracy, ci_lo, ci_hi.
    """
    ordered = sorted(rows, key=lambda row: row["accuracy"])  # barh draws bottom-up
    accuracy = np.array([row["accuracy"] for row in ordered])
    errors = np.array([[a - row["ci_lo"], row["ci_hi"] - a] for a, row in zip(accuracy, ordered)])
    with _figure(path, size=(6.4, 1.2 + 0.5 * len(ordered))) as (ax,):
        ax.barh([row["model"] for row in ordered], accuracy, xerr=errors.T, capsize=4)
        for y, (acc, row) in enumerate(zip(accuracy, ordered)):
            ax.text(row["ci_hi"], y, f"  {acc:.2%}", va="center")
        # Accuracies of competing models sit close together; start the axis near the worst CI so
        # the differences (and whether the CIs overlap) are visible rather than a row of full bars.
        low = min(row["ci_lo"] for row in ordered)
        ax.set_xlim(max(0.0, low - 0.05), 1.0)
        ax.set(xlabel=xlabel, title="model accuracy")
    return Path(path)


def plot_histories(named_histories: Mapping[str, pd.DataFrame], path: str | Path) -> Path:
    """Validation accuracy per epoch, one line per model (each history has epoch, val_acc)."""
    with _figure(path) as (ax,):
        for name, history in named_histories.items():
            ax.plot(history["epoch"], history["val_acc"], marker="o", label=name)
        _epoch_axis(ax)
        ax.set(ylabel="validation accuracy", title="validation accuracy per epoch")
        ax.legend()
    return Path(path)


def plot_accuracy_vs_speed(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy against inference throughput, one labelled point per model.

    Each row needs keys model, accuracy, images_per_s. Throughput spans orders of magnitude
    between a small CNN and a large pretrained backbone, hence the log-scale x axis.
    """
    with _figure(path) as (ax,):
        for row in rows:
            ax.scatter(row["images_per_s"], row["accuracy"])
            ax.annotate(row["model"], (row["images_per_s"], row["accuracy"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xscale("log")
        ax.margins(0.2)  # room for the labels of the outermost points
        ax.set(xlabel="inference throughput (images/s, log scale)", ylabel="test accuracy", title="accuracy vs speed")
        ax.grid(alpha=0.3, which="both")
    return Path(path)


def plot_mistakes(
    mistakes: pd.DataFrame,
    images: Sequence[np.ndarray],
    path: str | Path,
    *,
    class_names: Sequence[str],
    title: str,
    columns: int = 8,
) -> Path:
    """A grid of images (uint8 H x W x 3), each captioned true -> predicted (confidence); rows of
    `mistakes` need label and prob_positive. With no mistakes the figure says so."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(1.5 * columns, 1.8 * rows + 0.4), layout="constrained")
    cells = fig.subplots(rows, columns, squeeze=False).ravel()
    for cell in cells:
        cell.set_axis_off()
    for cell, image, row in zip(cells, images, mistakes.itertuples()):
        cell.imshow(image)
        predicted = int(row.prob_positive >= 0.5)
        confidence = max(row.prob_positive, 1 - row.prob_positive)
        cell.set_title(f"{class_names[int(row.label)]} → {class_names[predicted]}\n{confidence:.0%}", fontsize=8)
    if not len(images):
        cells[0].text(0, 0.5, "no mistakes", va="center")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_reliability(predictions: Mapping[str, pd.DataFrame], path: str | Path, *, bins: int = 10) -> Path:
    """Reliability diagrams before and after temperature scaling, a line per model: the share of
    label 1 against the predicted P(label 1) (columns label, prob_uncalibrated, prob_positive)."""
    with _figure(path, ncols=2, size=(10, 4.4)) as axes:
        for ax, column, title in zip(
            axes, ("prob_uncalibrated", "prob_positive"), ("before calibration", "after temperature scaling")
        ):
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
            for name, table in predictions.items():
                known = table.dropna(subset=[column])
                observed, predicted = calibration_curve(known["label"], known[column], n_bins=bins, strategy="quantile")
                ax.plot(predicted, observed, marker="o", label=name)
            ax.set(xlabel="predicted probability of label 1", ylabel="observed share of label 1", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return Path(path)


def plot_slice_accuracy(reports: Mapping[str, Mapping[str, Mapping]], path: str | Path, *, most: int = 14) -> Path:
    """Accuracy per slice per model with 95% CIs, a panel per evaluated set; `reports` is
    {model: {set: slice report (gendertune.tuning.evaluate.slices)}}. Per set, the `most` ranked slices with the lowest
    mean accuracy over models are shown: where the models fail is what the figure is for."""
    sets = list(dict.fromkeys(name for per_set in reports.values() for name in per_set))
    models = list(reports)
    with _figure(path, ncols=len(sets), size=(6.4 * len(sets), 1.5 + 0.32 * most * max(1, len(models)) ** 0.5)) as axes:
        for ax, name in zip(axes, sets):
            rows = [
                (model, row)
                for model in models
                for row in reports[model].get(name, {}).get("slices", [])
                if row["ranked"]
            ]
            by_slice: dict[str, list[float]] = {}
            for _, row in rows:
                by_slice.setdefault(f"{row['column']}={row['value']}", []).append(row["accuracy"])
            shown = sorted(by_slice, key=lambda key: np.mean(by_slice[key]))[:most][::-1]  # barh draws bottom-up
            height = 0.8 / max(1, len(models))
            for offset, model in enumerate(models):
                found = {f"{r['column']}={r['value']}": r for m, r in rows if m == model}
                ys = [i + (offset - (len(models) - 1) / 2) * height for i, key in enumerate(shown) if key in found]
                picked = [found[key] for key in shown if key in found]
                accuracy = np.array([r["accuracy"] for r in picked])
                errors = np.array([[a - r["ci95"][0], r["ci95"][1] - a] for a, r in zip(accuracy, picked)]).reshape(
                    -1, 2
                )
                ax.errorbar(accuracy, ys, xerr=errors.T, fmt="o", capsize=3, label=model)
            ax.set_yticks(range(len(shown)), [f"{key} (n={_slice_n(reports, name, key)})" for key in shown], fontsize=8)
            ax.set(xlabel="accuracy (95% Wilson CI)", title=f"{name}: the {len(shown)} hardest slices")
            ax.grid(alpha=0.3, axis="x")
            ax.legend(fontsize=8)
    return Path(path)


def _slice_n(reports: Mapping[str, Mapping[str, Mapping]], name: str, key: str) -> int:
    for per_set in reports.values():
        for row in per_set.get(name, {}).get("slices", []):
            if f"{row['column']}={row['value']}" == key:
                return row["n"]
    return 0
