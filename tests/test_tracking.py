"""MLflow tracking (gendertune.cluster.tracking) against a real sqlite store and a real Ray Tune run, read back
with MLflow's own client, as `mlflow ui --backend-store-uri` would read it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import ray.train
from conftest import free_port
from mlflow.tracking import MlflowClient
from ray import tune

from gendertune.cluster import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(output folder, its default store URI), shared: each new store runs MLflow's schema
    migrations, seconds on a small box. Tests use experiments of their own."""
    out = tmp_path_factory.mktemp("tracked-out")
    return out, tracking.resolve_uri("auto", str(out))


def test_resolve_uri_defaults_under_out_and_passes_explicit_uris_through(tmp_path, monkeypatch):
    assert tracking.resolve_uri(None, str(tmp_path)) is None
    assert tracking.resolve_uri("", str(tmp_path)) is None
    assert tracking.resolve_uri("auto", str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_uri("default", f"file://{tmp_path}") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("auto", "runs/a") == f"sqlite:///{tmp_path}/runs/a/mlflow.db"  # absolute
    for uri in ("http://127.0.0.1:5000", "sqlite:////elsewhere/mlflow.db", "databricks", "file:///tmp/mlruns"):
        assert tracking.resolve_uri(uri, "s3://bucket/out") == uri
    with pytest.raises(ValueError, match="pass --mlflow URI explicitly"):
        tracking.resolve_uri("auto", "s3://bucket/out")


def test_an_unreachable_server_or_an_unusable_uri_fails_at_once_as_a_user_error(tmp_path):
    with pytest.raises(ConnectionError, match="cannot reach the MLflow tracking server"):
        tracking.ensure_experiment(f"http://127.0.0.1:{free_port()}", "nowhere")
    with pytest.raises(ValueError, match="MLFLOW_ALLOW_FILE_STORE"):  # a plain folder is MLflow's old file store
        tracking.ensure_experiment(str(tmp_path / "mlruns"), "nowhere")


def test_train_v2_refuses_tune_callbacks(store):
    """Why a standalone `train` logs from the driver after fit(): Train V2 takes no Tune callback."""
    _, uri = store
    with pytest.raises(ValueError, match="Ray Tune callback is no longer supported"):
        ray.train.RunConfig(callbacks=tracking.tune_callbacks(uri, "refused"))
    assert tracking.tune_callbacks(None, "off") == []


def test_every_trial_is_a_run_with_its_params_and_per_epoch_metrics(ray_session, store, tmp_path):
    out, uri = store

    # Defined here, so Ray pickles it by value: the trial's worker can't import a test module.
    def _three_epochs(config):
        for epoch in range(1, 4):
            tune.report({"val_acc": config["lr"] * epoch, "epoch": epoch})

    tuner = tune.Tuner(
        _three_epochs,
        param_space={"lr": tune.grid_search([0.1, 0.2]), "optimizer": "adamw"},
        run_config=tune.RunConfig(
            name="search",
            storage_path=str(tmp_path),
            callbacks=tracking.tune_callbacks(uri, "trials", tags={"gendertune.model": "resnet18"}),
        ),
    )
    assert not tuner.fit().errors
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("trials")
    assert experiment.artifact_location == (out / tracking.ARTIFACTS_DIR).as_uri()  # not ./mlruns of the cwd
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(run.data.params["lr"]) for run in runs) == [0.1, 0.2]
    for run in runs:
        lr = float(run.data.params["lr"])
        assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "adamw"
        assert run.data.tags[tracking.KIND_TAG] == "trial" and run.data.tags["gendertune.model"] == "resnet18"
        history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([lr, 2 * lr, 3 * lr])
        assert "date" not in run.data.metrics  # strings in Tune's results are dropped, not errors


def test_a_model_result_is_one_run_with_flat_metrics_params_history_and_files(store, tmp_path):
    out, uri = store
    (tmp_path / "model.pt").write_bytes(b"weights" * 100)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "leaderboard.csv").write_text("rank,model\n1,resnet18\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "accuracy.png").write_bytes(b"png")
    metrics = {
        "model": "resnet18",
        "accuracy": 0.9,
        "accuracy_ci95": [0.85, 0.95],
        "roc_auc": None,
        "ece": float("nan"),
        "val_acc": 0.65,  # also a history column: the per-epoch series wins
        "gpu": False,
        "confusion_matrix": [[5, 1], [2, 7]],
        "per_class": {"Female": {"precision": 0.8, "recall": 0.7, "support": 6}, "Male": {"recall": 0.9}},
    }
    params = {
        "lr": 1e-3,
        "model": "resnet18",
        "weights": None,
        "eval_sets": ["utkface"],
        "data": "d" * 7000,
        "space": {"lr": ["loguniform", 1e-4, 1e-2]},
        "odd:key?": 1,
        "odd_key_": 2,
    }
    # first_step_at, a wall-clock timestamp (gendertune.tuning.train.worker's *_at columns), is no metric: not logged.
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "val_acc": [0.5, 0.6, 0.7],
            "train_loss": [1.0, None, 0.5],
            "node_id": ["a", "b", "c"],
            "first_step_at": [1.7e9, 1.7e9 + 5, 1.7e9 + 10],
        }
    )
    run_id = tracking.log_model_result(
        uri,
        "models",
        "resnet18",
        params,
        metrics,
        [tmp_path / "model.pt", tmp_path / "metrics.json", tmp_path / "leaderboard.csv", tmp_path / "figures"],
        history=history,
        tags={"gendertune.model": "resnet18"},
    )

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "resnet18" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((out / tracking.ARTIFACTS_DIR).as_uri())
    assert run.data.tags[tracking.KIND_TAG] == "model"
    assert run.data.metrics == pytest.approx(
        {
            "accuracy": 0.9,
            "accuracy_ci95_0": 0.85,
            "accuracy_ci95_1": 0.95,
            "confusion_matrix_0_0": 5,
            "confusion_matrix_0_1": 1,
            "confusion_matrix_1_0": 2,
            "confusion_matrix_1_1": 7,
            "precision_Female": 0.8,
            "recall_Female": 0.7,
            "support_Female": 6,
            "recall_Male": 0.9,
            "val_acc": 0.7,
            "train_loss": 0.5,  # a history metric's latest value
        }
    )
    assert run.data.params["lr"] == "0.001" and run.data.params["weights"] == "None"
    assert json.loads(run.data.params["eval_sets"]) == ["utkface"]
    assert json.loads(run.data.params["space/lr"]) == ["loguniform", 1e-4, 1e-2]
    assert len(run.data.params["data"]) == tracking.MAX_PARAM_VALUE and run.data.params["odd_key_"] == "2"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)] == [
        (1, 0.5),
        (2, 0.6),
        (3, 0.7),
    ]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 3]
    assert {a.path for a in client.list_artifacts(run_id)} == {"model.pt", "metrics.json", "leaderboard.csv", "figures"}
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/accuracy.png"]
    copy = client.download_artifacts(run_id, "model.pt", str(tmp_path / "download"))
    assert open(copy, "rb").read() == b"weights" * 100


def test_a_missing_artifact_logs_nothing_a_failed_model_is_marked_and_a_deleted_experiment_returns(store, tmp_path):
    _, uri = store
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(uri, "failures")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        tracking.log_model_result(uri, "failures", "resnet50", {}, {"accuracy": 1.0}, [tmp_path / "nope.pt"])
    assert client.search_runs([experiment_id]) == []
    (tmp_path / "error.log").write_text("Traceback ...\nMemoryError\n")
    run_id = tracking.log_model_result(uri, "failures", "vgg19", {}, {}, [tmp_path / "error.log"], status="FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["error.log"]
    client.delete_experiment(experiment_id)  # deleted in the UI: the next run brings it back
    assert tracking.ensure_experiment(uri, "failures") == experiment_id
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"
