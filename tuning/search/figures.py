"""The search's figures for report.html's Search section: the lr range test's curve, and Optuna's
own matplotlib plots of the screening study (optimisation history, intermediate values with the
pruned trials' early ends, parameter importances when enough trials completed). Ray-free."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

# fANOVA importances need a few completed trials to mean anything.
MIN_TRIALS_FOR_IMPORTANCE = 4


def plot_lr_curve(curve: dict, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot(curve["lrs"], curve["losses"])
    if curve["suggestion"] is not None:
        axes.axvline(curve["suggestion"], color="tab:red", linestyle="--", label=f"suggested {curve['suggestion']:.2g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="lr range test")
    if curve["suggestion"] is not None:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_study(storage_url: str, folder: Path, *, history: str, intermediate: str, importance: str) -> list[Path]:
    """Optuna's plots of the study `screening` in `storage_url` into `folder`; the paths written."""
    study = optuna.load_study(study_name="screening", storage=storage_url)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if not done:
        return []
    plots = [
        (optuna.visualization.matplotlib.plot_optimization_history, history),
        (optuna.visualization.matplotlib.plot_intermediate_values, intermediate),
    ]
    if sum(t.state == optuna.trial.TrialState.COMPLETE for t in done) >= MIN_TRIALS_FOR_IMPORTANCE:
        plots.append((optuna.visualization.matplotlib.plot_param_importances, importance))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for plot, name in plots:
            axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(6, 3.6)
            figure.tight_layout()
            figure.savefig(folder / name, dpi=100)
            plt.close(figure)
            written.append(folder / name)
    return written
