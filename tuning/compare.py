"""Compare architectures: search each, evaluate each best configuration once on test, rank them.

    OUT/config.json              the resolved compare, search and train settings
    OUT/searches/<model>/        Ray Tune state (resume reads it)
    OUT/models/<model>/          the best run in tuning.run_layout form (`gendertune predict` works on it)
    OUT/leaderboard.{csv,json,md} and its figures (tuning.leaderboard)
OUT may be an object-store URI (cluster.object_store): Tune writes there itself, the rest is
uploaded when the comparison ends, the leaderboard last.
A model that fails becomes an error row; the others still finish. With resume, a model whose run
folder is complete is not searched again, and an interrupted search continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path

import pandas as pd
import ray

from cluster.config import ConfigError, StageConfig
from cluster.object_store import OutputLocation, output_location
from cluster.runtime import ensure_ray
from cluster.shared_storage import require_shared
from cluster.storage import write_text_atomic
from data_prep.layout import PreparedData, open_prepared
from models.registry import get_spec
from tuning import leaderboard, run_layout
from tuning.search import SearchConfig, describe_params, run_search
from tuning.train import evaluate_held_out, train_into, write_run_outputs
from tuning.train_config import TrainConfig

SEED_MODELS = ("resnet50", "resnet18", "googlenet", "vgg19")


@dataclasses.dataclass
class CompareConfig(StageConfig):
    section = "compare"

    data: str = ""
    out: str = ""
    models: tuple[str, ...] = SEED_MODELS
    retrain: bool = False  # retrain the best configuration from scratch instead of keeping its checkpoint
    resume: bool = False

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ConfigError("compare: give --data PREP_OUT and --out DIR")
        if not self.models:
            raise ConfigError("compare.models: name at least one model")
        for model in self.models:
            get_spec(model)  # ValueError listing the known models
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"compare.models: {', '.join(self.models)} names a model twice")


def _settings_json(compare: CompareConfig, search: SearchConfig, base: TrainConfig) -> str:
    merged = {**json.loads(compare.to_json()), **json.loads(search.to_json()), **json.loads(base.to_json())}
    return json.dumps(merged, indent=2, sort_keys=True) + "\n"


def compare_one(model: str, location: OutputLocation, compare: CompareConfig, search: SearchConfig, base: TrainConfig,
                log=print) -> dict:
    """Search, then evaluate the winner once on test; returns its leaderboard row (its run_dir is
    the local folder; compare_into swaps in the storage location before writing)."""
    run_dir = location.local / "models" / model
    if compare.resume and run_layout.is_complete(run_dir):
        log(f"[compare] {model}: already finished, reusing {location.storage_path('models', model)}")
        summary = json.loads((run_dir / "search_summary.json").read_text())
        return leaderboard.model_row(model, run_layout.read_metrics(run_dir), run_dir=str(run_dir), **summary)
    started = time.perf_counter()
    prepared = open_prepared(compare.data)
    outcome = run_search(model, base, search, prepared, location.storage_path("searches", model),
                         resume=compare.resume, log=log)
    summary = {"trials_run": outcome.trials_run, "trials_pruned": outcome.trials_pruned,
               "best_params": describe_params(outcome.best_params)}
    log(f"[compare] {model}: best val acc {outcome.best_metrics['val_acc']:.4f} with {summary['best_params']}")
    config = dataclasses.replace(outcome.best_config, out=location.storage_path("models", model), data=prepared.root)
    if compare.retrain:
        metrics = train_into(OutputLocation(local=run_dir, storage=config.out), config, log=log)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / run_layout.CONFIG, config.to_json())
        state = {**outcome.best_state, "history": outcome.history.to_dict("records")}
        task = ray.remote(evaluate_held_out).options(num_cpus=config.cpus_per_worker, num_gpus=1 if config.gpu else 0)
        held_out = ray.get(task.remote(state, config.to_dict(), prepared.root, "test"))
        metrics = write_run_outputs(run_dir, config, prepared, state, outcome.best_metrics, held_out, "test",
                                    time.perf_counter() - started)
    write_text_atomic(run_dir / "search_summary.json", json.dumps(summary) + "\n")
    return leaderboard.model_row(model, metrics, run_dir=str(run_dir), **summary)


def run_compare(compare: CompareConfig, search: SearchConfig, base: TrainConfig, *, log=print) -> pd.DataFrame:
    prepared = open_prepared(compare.data)
    if "test" not in prepared.splits:
        raise ConfigError(f"{compare.data} has no test split; prep with 2 or 3 --ratios (or an official partition with test images)")
    with output_location(compare.out, ray_dirs=frozenset({"searches", run_layout.RAY_RUN_NAME})) as location:
        return compare_into(location, prepared, compare, search, base, log=log)


def compare_into(location: OutputLocation, prepared: PreparedData, compare: CompareConfig, search: SearchConfig,
                 base: TrainConfig, *, log=print) -> pd.DataFrame:
    out = location.local
    if (out / leaderboard.CSV).exists() and not compare.resume:
        raise FileExistsError(f"{location.storage} already holds a leaderboard; choose another --out or pass --resume")
    ensure_ray()
    require_shared(reads=[prepared.root], writes=[location.storage])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", _settings_json(compare, search, base))
    rows = []
    for model in compare.models:
        try:
            rows.append(compare_one(model, location, compare, search, base, log=log))
        except Exception as err:  # one model's failure (e.g. out of memory) must not sink the others
            error_log = out / "models" / model / "error.log"
            write_text_atomic(error_log, traceback.format_exc())
            log(f"[compare] {model} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                f"(traceback in {location.storage_path('models', model, 'error.log')})")
            rows.append(leaderboard.error_row(model, err))
    table = leaderboard.rank_rows(rows)
    histories, confusion = {}, {}
    for row in table[table["status"] == "ok"].itertuples():
        histories[row.model] = pd.read_csv(Path(row.run_dir) / run_layout.HISTORY)
        confusion[row.model] = run_layout.read_metrics(row.run_dir)["confusion_matrix"]
    # Readers open the runs where they are stored, not this process's working folder.
    table["run_dir"] = [location.storage_path("models", model) if status == "ok" else ""
                        for model, status in zip(table["model"], table["status"])]
    leaderboard.write_leaderboard(table, out, histories, confusion)
    return table
