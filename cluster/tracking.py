"""Experiment tracking in MLflow: what `--mlflow [URI]` means, and what each logged run holds.

This module owns the tracking URI (`resolve_uri`: off, a local store under --out, or a URI as
given), the experiment every writer shares (`ensure_experiment`), and the two kinds of run:
- one run per Tune trial, from Ray Tune's own `MLflowLoggerCallback` (`tune_callbacks`): the
  trial's sampled parameters, and every result it reports (step = training_iteration, which is
  the epoch: both trial modes report once per epoch);
- one run per trained model (`log_model_result`): its settings, its per-epoch history
  (step = epoch), its final metrics flattened to numbers, and its files as artifacts.

Everything is logged from the driver process: Tune runs its callbacks there, and a standalone
`train` logs its history after `fit()` from the history its checkpoint carries, which spans every
restart and resume. Ray Train V2 takes no Tune callbacks (`ray.train.RunConfig` raises
ValueError), and `setup_mlflow` on the rank-0 worker would need every worker node to reach the
store, and a local sqlite file to take writes from several processes; from the driver, a local
store has one writer and a remote server needs only the driver to reach it.

The default local store is sqlite (`OUT/mlflow.db`, artifacts in `OUT/mlartifacts/`): MLflow 3
refuses its folder store (`./mlruns`) unless MLFLOW_ALLOW_FILE_STORE=true.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from gendertune.base.errors import UnreachableError, UserInputError
from gendertune.cluster.storage import is_uri

AUTO_SETTINGS = frozenset({"auto", "default"})
STORE_FILE = "mlflow.db"
TRAIN_EXPERIMENT = "gendertune-train"
COMPARE_EXPERIMENT = "gendertune-compare"
ARTIFACTS_DIR = "mlartifacts"  # beside the sqlite file, as `mlflow server` lays out its own store
KIND_TAG = "gendertune.kind"
# MLflow's limits (mlflow.utils.validation): longer values are rejected or truncated with a
# warning per value, so cut them here, once.
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE = 250, 6000, 8000
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
CONNECT_TIMEOUT_S = 10
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- ]")
# History columns named *_at are wall-clock timestamps (gendertune.tuning.train.worker's TIMING_COLUMNS): they date
# an epoch, they measure nothing, so they are no metric to chart.
TIMESTAMP_SUFFIX = "_at"
# mlflow itself is imported inside the functions: a slow import, paid only with --mlflow.


def resolve_uri(setting: str | None, out: str) -> str | None:
    """The tracking URI for `--mlflow SETTING`: None when off (no flag, or ""); for `auto`/`default`
    (a bare `--mlflow`) a sqlite store in the local output folder `out`; otherwise SETTING as given
    (http(s)://, sqlite:, file:, databricks)."""
    setting = (setting or "").strip()
    if not setting:
        return None
    if setting.lower() not in AUTO_SETTINGS:
        return setting
    if is_uri(out):
        raise UserInputError(
            f"--mlflow without a URI keeps its store in --out, but {out} is an object store; "
            "pass --mlflow URI explicitly (a tracking server http://HOST:5000, or sqlite:////PATH/mlflow.db)"
        )
    if not out:
        raise UserInputError("--mlflow without a URI keeps its store in --out; give --out")
    # `mlflow ui --backend-store-uri sqlite:////abs/out/mlflow.db` opens it; four slashes = absolute.
    return "sqlite:///" + (Path(out.removeprefix("file://")).absolute() / STORE_FILE).as_posix()


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of `experiment` in the store at `uri`, created (or restored from deletion) if need be.
    Call it before any long work: a wrong URI or an unreachable server then fails at once."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_reachable(uri)
    # A new sqlite store announces its schema migration at INFO ("Creating initial MLflow database
    # tables..."), through MLflow's own handler: housekeeping, not the stage's progress.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        client = MlflowClient(tracking_uri=uri)
        existing = client.get_experiment_by_name(experiment)
    except MlflowException as err:  # e.g. a folder (MLflow 3 refuses that store) or an unknown scheme
        raise UserInputError(f"MLflow can't use the tracking URI {uri!r}: {err.message}") from err
    if existing is None:
        try:
            return client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        except MlflowException:  # another process created it first
            existing = client.get_experiment_by_name(experiment)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":  # deleted in the UI: new runs there would be refused
        client.restore_experiment(existing.experiment_id)
    return existing.experiment_id


def _check_reachable(uri: str) -> None:
    """A server that is not there fails in seconds: MLflow's own client retries a refused
    connection with backoff (7 times, up to 120 s apart) for minutes before it gives up."""
    address = urllib.parse.urlsplit(uri)
    if address.scheme not in ("http", "https") or not address.hostname:
        return
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UnreachableError(f"cannot reach the MLflow tracking server {uri}: {err}") from None


def _artifact_location(uri: str) -> str | None:
    """Next to a sqlite file; else the store's default. MLflow's default for a sqlite store is
    ./mlruns in whatever folder the process runs in, which scatters artifacts."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).absolute()
    database.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
    return (database.parent / ARTIFACTS_DIR).as_uri()


def tune_callbacks(uri: str | None, experiment: str, *, tags: Mapping[str, Any] | None = None) -> list:
    """Tune callbacks that log one MLflow run per trial into `experiment` ([] when `uri` is None):
    the trial's config as params (Ray flattens nested dicts to `a/b`) and each reported result as
    metrics (numbers only; strings such as `date` are dropped). Runs are tagged with `tags`
    (gendertune.kind=trial unless `tags` says otherwise). Tune pickles its run config, callbacks
    included, into its experiment state: a resumed search (Tuner.restore) logs to the same store,
    a new MLflow run for each trial it resumes."""
    if uri is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    ensure_experiment(uri, experiment)  # ours, so its artifacts go beside the store
    # save_artifact=False: True uploads each trial's whole folder, checkpoints (GBs) included.
    return [
        MLflowLoggerCallback(
            tracking_uri=uri,
            experiment_name=experiment,
            save_artifact=False,
            tags=_tags({KIND_TAG: "trial", **(tags or {})}),
        )
    ]


def log_model_result(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    artifacts: Iterable[str | Path] = (),
    *,
    history: pd.DataFrame | None = None,
    tags: Mapping[str, Any] | None = None,
    status: str = "FINISHED",
) -> str:
    """Log one finished model as a new run in `experiment`; returns the run id.

    `params` go in as strings (nested dicts as `a/b`, lists as JSON, values cut to MLflow's limit);
    `metrics` are flattened to numbers (`per_class` as `recall_Female`, like the leaderboard's
    columns; other nested dicts as `a_b`, lists as `a_0`, `a_1`; None, bools and strings dropped).
    `history` has an `epoch` column: every other numeric column but the `*_at` timestamps is
    logged per epoch with step=epoch (a final metric of the same name is left out). `artifacts`
    (files or folders) are copied into the run. Runs are tagged with `tags` (gendertune.kind=model
    unless `tags` says otherwise, e.g. "ensemble"). `status` is MLflow's run status: FINISHED, or
    FAILED for a model whose run failed."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    artifacts = [Path(path) for path in artifacts]
    missing = [str(path) for path in artifacts if not path.exists()]
    if missing:  # before the run exists, so a typo leaves no half-logged run behind
        raise FileNotFoundError(f"no such artifact(s) to log: {', '.join(missing)}")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(
        ensure_experiment(uri, experiment), run_name=run_name, tags=_tags({KIND_TAG: "model", **(tags or {})})
    ).info.run_id
    try:
        now = int(time.time() * 1000)
        # Keyed by the cleaned name: two names that clean to one would fail the whole batch.
        param_list = [Param(k, v) for k, v in {_key(k): _param_value(v) for k, v in _flat_params(params)}.items()]
        points = [(_key(k), v, step) for k, v, step in _history_points(history)] if history is not None else []
        # A per-epoch series keeps its name; a final value of the same name (metrics.json's mean
        # train_images_per_s) would be a stray step 0 in it.
        per_epoch = {k for k, _, _ in points}
        final = {k: v for k, v in ((_key(k), v) for k, v in _flat_numbers(metrics)) if k not in per_epoch}
        metric_list = [Metric(k, v, now, 0) for k, v in final.items()]
        metric_list += [Metric(k, v, now, step) for k, v, step in points]
        for start in range(0, len(param_list), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=param_list[start : start + PARAMS_PER_BATCH])
        for start in range(0, len(metric_list), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metric_list[start : start + METRICS_PER_BATCH])
        for path in artifacts:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            else:
                client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status=status)
    return run_id


def _key(name: str) -> str:
    return _INVALID_KEY_CHARS.sub("_", str(name)).strip("/")[:MAX_KEY]


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_key(k): str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    # "/" joins nested keys, as Ray's callback does for trial configs: both kinds of run line up.
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from _flat_params(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _flat_numbers(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "per_class" and isinstance(value, Mapping):
            # {"Female": {"recall": r}} -> recall_Female: the leaderboard's column names.
            for class_name, scores in value.items():
                if isinstance(scores, Mapping):
                    yield from ((f"{prefix}{score}_{class_name}", number) for score, number in _flat_numbers(scores))
        elif isinstance(value, Mapping):
            yield from _flat_numbers(value, f"{name}_")
        elif isinstance(value, (list, tuple)):
            yield from _flat_numbers({str(index): item for index, item in enumerate(value)}, f"{name}_")
        elif _is_number(value):
            yield name, float(value)


def _is_number(value: Any) -> bool:
    # bool is an int in Python, but a flag such as `gpu` is a setting, not a measurement; NaN
    # (e.g. ROC-AUC on one class) would only break MLflow's charts.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _history_points(history: pd.DataFrame) -> Iterator[tuple[str, float, int]]:
    for row in history.to_dict("records"):
        epoch = int(row.pop("epoch"))
        yield from (
            (column, float(value), epoch)
            for column, value in row.items()
            if _is_number(value) and not str(column).endswith(TIMESTAMP_SUFFIX)
        )


def run_artifacts(run_dir: Path) -> list[Path]:
    """A run folder's files worth keeping with its MLflow run: everything at its top level (model,
    metrics, history, predictions, figures), never Ray's checkpoint folder beneath it."""
    return sorted(path for path in Path(run_dir).iterdir() if path.is_file())
