"""Compare architectures: search each under the budget policy, evaluate each chosen configuration
once on test, rank them. The folder's layout is gendertune.tuning.compare.layout. OUT may be an
object-store URI (gendertune.cluster.storage): Tune and Ray Train write there themselves, the rest
is uploaded when the comparison ends, each model's metrics.json after its other files, the
leaderboard last. A model that fails becomes an error row; the others still finish. With resume,
a model whose run folder is complete is not searched again, and an interrupted search continues
where it stopped. Where the cluster holds several models' runs, their searches run side by side
(one driver thread each, each planning with its share of the cluster: runtime.resource_share).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import ray

from gendertune.base.config import ConfigError
from gendertune.base.errors import UserInputError
from gendertune.cluster import tracking
from gendertune.cluster.runtime import (
    Share,
    compute_parallelism,
    ensure_ray,
    gpu_parallelism,
    require_resources,
    resource_share,
    run_on_other_nodes,
)
from gendertune.cluster.shared_storage import require_shared
from gendertune.cluster.storage import (
    OutputExistsError,
    OutputLocation,
    claim_folder,
    delete_tree,
    is_uri,
    join,
    list_files,
    output_location,
    write_text_atomic,
)
from gendertune.data_prep.layout import PreparedData, open_prepared, read_slices
from gendertune.models.registry import get_spec
from gendertune.models.weights import fetch_hub_weights
from gendertune.tuning.compare import ensemble, layout, leaderboard, report
from gendertune.tuning.compare.config import CompareConfig
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.evaluate.eval_sets import EvalSet, evaluate_run, load_eval_set, missing_sets
from gendertune.tuning.search import figures
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.run import CORES_PER_TRIAL, STUDY_FILE, SearchInterrupted, check_search, run_search
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.run import evaluate_held_out_and_write

logger = logging.getLogger(__name__)
# The files that vouch for a finished part of OUT, uploaded to an object store after every other
# file: each model's (and the ensemble's) metrics.json, then the leaderboard for the whole comparison.
COMPLETION_MARKERS = (run_layout.METRICS, leaderboard.CSV, leaderboard.JSON, leaderboard.MD)


def _settings_json(compare: CompareConfig, search: SearchConfig, base: TrainConfig) -> str:
    merged = {**json.loads(compare.to_json()), **json.loads(search.to_json()), **json.loads(base.to_json())}
    return json.dumps(merged, indent=2, sort_keys=True) + "\n"


# Settings a resumed comparison may change: they act after the searches (which sets are scored, the
# ensemble), say to resume at all, or say how many searches share the cluster (a resume may run on
# another). Any other difference would mix two experiments in one leaderboard.
RESUMABLE_CHANGES = {
    ("compare", "resume"),
    ("compare", "ensemble_k"),
    ("compare", "models_at_once"),
    ("train", "eval_sets"),
}


def read_saved_settings(path: Path, storage: str) -> dict:
    """The settings a comparison was started with (its config.json), or a one-line input error
    when that file is damaged: without it a resume cannot show it continues the same experiment."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        saved, problem = None, f"is not valid JSON ({err})"
    else:
        problem = "does not hold a comparison's settings"
    if not isinstance(saved, dict) or not all(isinstance(section, dict) for section in saved.values()):
        raise UserInputError(
            f"{storage}: its {layout.CONFIG} {problem}, so a resume cannot check it continues the same "
            "comparison; start it again in another --out"
        )
    return saved


def settings_changed(saved: dict, current: dict) -> list[str]:
    """`section.key: old -> new` for every setting that differs, except RESUMABLE_CHANGES."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        before, after = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            if (section, key) not in RESUMABLE_CHANGES and before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def models_at_once(requested: int, n_models: int, *, cpus: int, gpus: int, base: TrainConfig) -> int:
    """How many models' searches run side by side: `requested`, else as many as the cluster holds
    shares for, where a share holds one full-length run (its workers' GPUs, or its workers' CPUs and
    at least CORES_PER_TRIAL cores); never more than there are models."""
    if not requested:
        per = base.workers if base.gpu else max(CORES_PER_TRIAL, math.ceil(base.workers * base.cpus_per_worker))
        requested = (gpus if base.gpu else cpus) // per
    return max(1, min(requested, n_models))


def require_room_side_by_side(at_once: int, base: TrainConfig, *, cluster_cpus: float, cluster_gpus: float) -> None:
    """Refuse, in seconds, side-by-side searches whose full-length runs the cluster cannot all place
    at once (with one CPU left for their data loading): Ray would hold some runs while other runs'
    data waits for CPUs, and on a small cluster that waits forever."""
    cpus, gpus = at_once * base.workers * base.cpus_per_worker + 1, at_once * base.workers * int(base.gpu)
    if cpus > cluster_cpus or gpus > cluster_gpus:
        raise ConfigError(
            f"compare.models_at_once {at_once}: {at_once} searches side by side need {cpus:g} CPUs"
            + (f" and {gpus} GPUs" if gpus else "")
            + f"; the cluster has {cluster_cpus:g} CPUs"
            + (f" and {cluster_gpus:g} GPUs" if gpus else "")
            + ": ask for fewer (0 = as many as fit)"
        )


def side_by_side(items: list[str], work: Callable[[str], dict], *, at_once: int, share: Share) -> list[dict]:
    """`work(item)` for every item, `at_once` at a time, each in a driver thread that plans with
    `share` of the cluster; the results in `items`' order. The threads are daemons and the main
    thread waits in short joins, so Ctrl-C reaches it: the comparison then stops as interrupted
    (each search's state on disk resumes with --resume) instead of waiting for the searches."""
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()
    for item in items:
        pending.put(item)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def worker() -> None:
        with resource_share(share):
            while not errors:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[item] = work(item)
                except BaseException as err:  # re-raised in the main thread, which stops the rest
                    errors.append(err)

    threads = [threading.Thread(target=worker, name=f"gendertune-search-{n}", daemon=True) for n in range(at_once)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        raise SearchInterrupted(
            "the searches were interrupted; run the same command with --resume to continue them"
        ) from None
    if errors:
        raise errors[0]
    return [results[item] for item in items]


def compare_one(
    model: str,
    location: OutputLocation,
    compare: CompareConfig,
    search: SearchConfig,
    base: TrainConfig,
    eval_sets: list[EvalSet],
    *,
    tracking_uri: str | None = None,
) -> dict:
    """Search, then evaluate the chosen configuration once on test and on every eval set; returns its
    leaderboard row (its run_dir is the local folder; compare_into swaps in the storage location before writing)."""
    run_dir = layout.model_dir(location.local, model)
    if compare.resume and run_layout.is_complete(run_dir):
        logger.info(f"[compare] {model}: already finished, reusing {location.storage_path(layout.MODELS, model)}")
    else:
        search_and_evaluate(model, run_dir, location, compare, search, base, tracking_uri=tracking_uri)
        drop_checkpoints(location.storage_path(layout.SEARCHES, model))
    for eval_set in missing_sets(run_dir, eval_sets):  # on resume, only sets added since
        scores = evaluate_run(run_dir, eval_set)
        logger.info(
            f"[compare] {model}: {eval_set.name} accuracy {scores['accuracy']:.4f} "
            f"(95% CI {scores['accuracy_ci95'][0]:.4f}-{scores['accuracy_ci95'][1]:.4f})"
        )
    summary = json.loads((run_dir / layout.SEARCH_SUMMARY).read_text())
    return leaderboard.model_row(model, run_layout.read_metrics(run_dir), run_dir=str(run_dir), search=summary)


def drop_checkpoints(root: str) -> None:
    """Delete the trials' and full-length runs' checkpoints below a finished model's search (a
    folder or a URI). They hold weights plus optimizer state (VGG19: 143 M parameters, three copies
    with AdamW) and only a resume of that search could use them; the chosen one now lives in
    models/<model>/model.pt. Each trial's params, results and progress stay, so the search can
    still be inspected."""
    if is_uri(root):
        found = {
            "/".join(parts[: depth + 1])
            for parts in (path.split("/") for path in list_files(root))
            for depth, part in enumerate(parts[:-1])
            if part.startswith("checkpoint_")
        }
        for relative in sorted(found):
            delete_tree(join(root, relative))
    else:
        for folder in sorted(Path(root).rglob("checkpoint_*")):
            if folder.is_dir():
                shutil.rmtree(folder)


def search_and_evaluate(
    model: str,
    run_dir: Path,
    location: OutputLocation,
    compare: CompareConfig,
    search: SearchConfig,
    base: TrainConfig,
    *,
    tracking_uri: str | None = None,
) -> None:
    started = time.perf_counter()
    prepared = open_prepared(compare.data)
    searches = location.storage_path(layout.SEARCHES, model)
    outcome = run_search(
        model,
        base,
        search,
        prepared,
        searches,
        resume=compare.resume,
        callbacks=tracking.tune_callbacks(
            tracking_uri,
            tracking.COMPARE_EXPERIMENT,
            tags={"gendertune.model": model, "gendertune.out": location.storage},
        ),
    )
    summary = outcome.summary()
    logger.info(
        f"[compare] {model}: {'kept the user' if outcome.kept else 'replaced the user'}'s configuration; "
        f"final run {outcome.best_config.epochs} epochs, best val acc {outcome.best_metrics['val_acc']:.4f} "
        f"with {summary['best_params']}"
    )
    config = dataclasses.replace(
        outcome.best_config, out=location.storage_path(layout.MODELS, model), data=prepared.root
    )
    # The summary and figures first: metrics.json, written last, marks the model finished.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / layout.SEARCH_SUMMARY, json.dumps(summary, default=str) + "\n")
    write_search_figures(summary, searches, run_dir)
    write_text_atomic(run_dir / run_layout.CONFIG, config.to_json())
    evaluate_held_out_and_write(run_dir, config, prepared, outcome.best_state, outcome.best_metrics, started=started)


def write_search_figures(summary: dict, searches: str, run_dir: Path) -> None:
    """The lr curve and Optuna's plots of the screening study (kept beside the search when it
    writes to a folder; an object-store search keeps its study in memory, so it has no plots)."""
    if summary.get("lr_curve"):
        figures.plot_lr_curve(summary["lr_curve"], run_dir / layout.LR_CURVE)
    study = Path(searches) / STUDY_FILE
    if not is_uri(searches) and study.is_file():
        figures.plot_study(
            f"sqlite:///{study}",
            run_dir,
            history=layout.SEARCH_HISTORY,
            intermediate=layout.SEARCH_INTERMEDIATE,
            importance=layout.SEARCH_IMPORTANCE,
        )


def run_compare(
    compare: CompareConfig, search: SearchConfig, base: TrainConfig, *, tracking_uri: str | None = None
) -> pd.DataFrame:
    prepared = open_prepared(compare.data)
    if "test" not in prepared.splits:
        raise ConfigError(
            f"{compare.data} has no test split; prep with 2 or 3 --ratios (or an official partition with test images)"
        )
    eval_sets = [load_eval_set(spec, attribute=prepared.manifest["attribute"]) for spec in base.eval_sets]
    for model in compare.models:
        check_search(model, base, search)
    with output_location(
        compare.out,
        stage="compare",
        markers=COMPLETION_MARKERS,
        ray_dirs=frozenset({layout.SEARCHES, run_layout.RAY_RUN_NAME}),
    ) as location:
        return compare_into(location, prepared, compare, search, base, eval_sets, tracking_uri=tracking_uri)


def compare_into(
    location: OutputLocation,
    prepared: PreparedData,
    compare: CompareConfig,
    search: SearchConfig,
    base: TrainConfig,
    eval_sets: list[EvalSet],
    *,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    out = location.local
    if (out / leaderboard.CSV).exists() and not compare.resume:
        raise OutputExistsError(
            f"{location.storage} already holds a leaderboard; choose another --out or pass --resume"
        )
    settings = _settings_json(compare, search, base)
    if compare.resume and (out / layout.CONFIG).is_file():
        saved = read_saved_settings(out / layout.CONFIG, location.storage)
        for config in (compare, search, base):  # settings added since it started count as their defaults
            saved[config.section] = type(config).with_new_defaults(saved.get(config.section, {}))
        changes = settings_changed(saved, json.loads(settings))
        if changes:
            raise ConfigError(
                f"{location.storage} was started with other settings ({'; '.join(changes)}); resume it "
                "with the same flags (only --eval-set and --ensemble-k may change), or choose another --out"
            )
    ensure_ray()
    require_resources(workers=base.workers, cpus_per_worker=base.cpus_per_worker, gpus_per_worker=int(base.gpu))
    at_once = models_at_once(
        compare.models_at_once, len(compare.models), cpus=compute_parallelism(), gpus=gpu_parallelism(), base=base
    )
    resources = ray.cluster_resources()
    require_room_side_by_side(at_once, base, cluster_cpus=resources.get("CPU", 0), cluster_gpus=resources.get("GPU", 0))
    if base.pretrained:  # the driver fetched them for its node in check_search
        for model in compare.models:
            run_on_other_nodes(fetch_hub_weights, get_spec(model))
    require_shared(reads=[prepared.root], writes=[location.storage])
    claim_folder(out, "compare")
    write_text_atomic(out / layout.CONFIG, settings)
    if tracking_uri:
        tracking.ensure_experiment(tracking_uri, tracking.COMPARE_EXPERIMENT)  # an unreachable server fails now

    def row(model: str) -> dict:
        try:
            return compare_one(model, location, compare, search, base, eval_sets, tracking_uri=tracking_uri)
        except Exception as err:  # one model's failure (e.g. out of memory) must not sink the others
            error_log = layout.model_dir(out, model) / layout.ERROR_LOG
            write_text_atomic(error_log, traceback.format_exc())
            logger.warning(
                f"[compare] {model} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                f"(traceback in {location.storage_path(layout.MODELS, model, layout.ERROR_LOG)})"
            )
            return leaderboard.error_row(model, err)

    if at_once == 1:
        rows = [row(model) for model in compare.models]
    else:
        share = Share(cpus=max(1, compute_parallelism() // at_once), gpus=gpu_parallelism() // at_once)
        logger.info(
            f"[compare] searching {at_once} models side by side, each with {share.cpus} CPU cores"
            + (f" and {share.gpus} GPUs" if share.gpus else "")
        )
        rows = side_by_side(list(compare.models), row, at_once=at_once, share=share)
    names = [s.name for s in eval_sets]
    ranked = leaderboard.rank_rows(rows, eval_sets=names)
    members = ensemble.choose_members(ranked, compare.ensemble_k)
    table = ranked
    if members:
        scores = ensemble.write_ensemble(
            out,
            ranked[ranked["model"].isin(members)],
            class_names=prepared.class_names,
            eval_sets=names,
            test_groups=read_slices(prepared),
            eval_groups={s.name: s.table[["path", *s.slice_columns]] for s in eval_sets if s.slice_columns},
        )
        table = leaderboard.add_ensemble(
            ranked, leaderboard.ensemble_row(scores, run_dir=str(out / layout.ENSEMBLE)), eval_sets=names
        )
        logger.info(f"[compare] ensemble of {', '.join(members)}: test accuracy {scores['accuracy']:.4f}")
    histories, confusion, slices, calibration = {}, {}, {}, {}
    for row in table[table["status"] == "ok"].itertuples():
        metrics = run_layout.read_metrics(row.run_dir)
        slices[row.model] = metrics.get("slices", {})
        if row.kind == "model":
            histories[row.model] = pd.read_csv(Path(row.run_dir) / run_layout.HISTORY)
            confusion[row.model] = metrics["confusion_matrix"]
            calibration[row.model] = pd.read_csv(Path(row.run_dir) / run_layout.PREDICTIONS)
    # Readers open the runs where they are stored, not this process's working folder.
    table["run_dir"] = [
        location.storage_path(*([layout.MODELS, model] if kind == "model" else [layout.ENSEMBLE]))
        if status == "ok"
        else ""
        for model, kind, status in zip(table["model"], table["kind"], table["status"])
    ]
    leaderboard.write_leaderboard(
        table, out, histories, confusion, slices, calibration, class_names=prepared.class_names
    )
    report.write_report(out)
    if tracking_uri:
        log_models(tracking_uri, out, table, location.storage)
    return table


def log_models(uri: str, out: Path, table: pd.DataFrame, storage: str) -> None:
    """One MLflow run per leaderboard row: its settings, history, final metrics and files, with the
    comparison's leaderboard and report beside them."""
    shared = [out / name for name in (leaderboard.CSV, leaderboard.MD, report.REPORT)]
    for row in table.itertuples():
        tags = {"gendertune.kind": row.kind, "gendertune.out": storage}
        if row.status != "ok":
            tracking.log_model_result(
                uri,
                tracking.COMPARE_EXPERIMENT,
                row.model,
                {},
                {},
                [layout.model_dir(out, row.model) / layout.ERROR_LOG],
                tags=tags,
                status="FAILED",
            )
            continue
        run_dir = layout.model_dir(out, row.model) if row.kind == "model" else out / layout.ENSEMBLE
        metrics = {**run_layout.read_metrics(run_dir), "rank": row.rank, "mcnemar_p_vs_leader": row.mcnemar_p_vs_leader}
        params = (
            json.loads((run_dir / run_layout.CONFIG).read_text())["train"]
            if row.kind == "model"
            else {"members": row.members}
        )
        history = pd.read_csv(run_dir / run_layout.HISTORY) if row.kind == "model" else None
        tracking.log_model_result(
            uri,
            tracking.COMPARE_EXPERIMENT,
            row.model,
            params,
            metrics,
            [*tracking.run_artifacts(run_dir), *shared],
            history=history,
            tags=tags,
        )
