"""Object-store URIs for --data and --out, against a real S3 protocol (a local moto server):
prep writes its shards there, compare's Tune and Train state and its leaderboard go there,
predict and `leaderboard` read from there, and a marker is only ever uploaded last."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from cluster import object_store
from gendertune.cli import main
from cluster.storage import OutputExistsError
from conftest import prep_sample
from data_prep.layout import MANIFEST, open_prepared
from tuning import leaderboard, run_layout
from tuning.train import RunAlreadyComplete, run_training
from tuning.train_config import TrainConfig


def test_uri_detection_and_joining():
    assert object_store.is_uri("s3://bucket/run") and object_store.is_uri("gs://b/x")
    assert not object_store.is_uri("/tmp/run") and not object_store.is_uri("file:///tmp/run")
    assert not object_store.is_uri("runs/a://b") and not object_store.is_uri(None)
    assert object_store.join("s3://bucket/run/", "models", "/resnet18") == "s3://bucket/run/models/resnet18"
    assert object_store.join("/tmp/run", "models") == "/tmp/run/models"


def test_completion_markers_upload_last_inner_folders_first():
    order = object_store.upload_order(["leaderboard.csv", "models/a/metrics.json", "models/a/history.csv",
                                       "config.json", "models/a/model.pt", "leaderboard.json"])
    assert order[:3] == ["models/a/history.csv", "models/a/model.pt", "config.json"]
    assert order[3] == "models/a/metrics.json" and set(order[4:]) == {"leaderboard.csv", "leaderboard.json"}


def test_an_unknown_scheme_gets_a_clear_error():
    with pytest.raises(object_store.StorageURIError, match="nosuchscheme://x/y: cannot open this storage URI"):
        object_store.is_file("nosuchscheme://x/y")


def test_output_location_uploads_what_a_failed_stage_wrote_but_no_marker(s3_bucket):
    uri = f"{s3_bucket}/unit/stopped-run"
    with pytest.raises(RuntimeError, match="stopped"):
        with object_store.output_location(uri) as location:
            (location.local / "config.json").write_text("{}")
            raise RuntimeError("stopped")
    assert object_store.list_files(uri) == ["config.json"]
    # The next attempt starts from what is there (a resume compares configs with it).
    with object_store.output_location(uri) as location:
        assert (location.local / "config.json").read_text() == "{}"
        (location.local / "metrics.json").write_text("{}")
    assert object_store.list_files(uri) == ["config.json", "metrics.json"]


def test_prep_to_a_uri_is_never_complete_half_way_and_refuses_foreign_objects(s3_bucket, ray_session, synthetic_sample):
    uri = f"{s3_bucket}/unit/prep-interrupted"
    with pytest.raises(KeyboardInterrupt):
        with object_store.fresh_output(uri, marker=MANIFEST) as location:
            object_store.write_bytes(object_store.join(location.storage, "train", "part-00000.parquet"), b"x")
            raise KeyboardInterrupt
    left = object_store.list_files(uri)
    assert MANIFEST not in left and object_store.IN_PROGRESS in left
    with pytest.raises(Exception, match="not a prepared dataset"):
        open_prepared(uri)
    # A re-run clears its own interrupted attempt and finishes.
    prep_sample(synthetic_sample, uri, image_size=32)
    files = object_store.list_files(uri)
    assert MANIFEST in files and object_store.IN_PROGRESS not in files and "train/part-00000.parquet" in files
    foreign = f"{s3_bucket}/unit/someone-elses"
    object_store.write_bytes(f"{foreign}/notes.txt", b"mine")
    with pytest.raises(OutputExistsError, match="not a gendertune output"):
        prep_sample(synthetic_sample, foreign, image_size=32)
    assert object_store.read_text(f"{foreign}/notes.txt") == "mine"


@pytest.fixture(scope="module")
def s3_comparison(s3_bucket, ray_session, synthetic_sample):
    """prep -> compare (TorchTrainer trials) with --data and --out both on S3."""
    prep_uri, out_uri = f"{s3_bucket}/e2e/prep", f"{s3_bucket}/e2e/cmp"
    prep_sample(synthetic_sample, prep_uri, image_size=32, split="identity", ratios=[0.6, 0.2, 0.2])
    assert main(["compare", "--data", prep_uri, "--out", out_uri, "--models", "resnet18", "--trials", "1",
                 "--epochs", "1", "--trial-mode", "train", "--batch-size", "32"]) == 0
    return prep_uri, out_uri


def test_compare_writes_its_leaderboard_runs_and_checkpoints_to_the_uri(s3_comparison, capsys):
    _, out_uri = s3_comparison
    files = object_store.list_files(out_uri)
    for name in (leaderboard.CSV, leaderboard.JSON, leaderboard.MD, "config.json",
                 f"models/resnet18/{run_layout.METRICS}", f"models/resnet18/{run_layout.MODEL}"):
        assert name in files
    # Tune's experiment state was written to the bucket by Ray itself; the trials' checkpoints
    # were deleted from there once the model's search was done.
    assert any(f.startswith("searches/resnet18/search/") for f in files)
    assert not any(part.startswith("checkpoint_") for f in files for part in f.split("/")[:-1])
    table = leaderboard.read_leaderboard(out_uri)
    assert table.loc[0, "status"] == "ok" and table.loc[0, "run_dir"] == f"{out_uri}/models/resnet18"
    capsys.readouterr()
    assert main(["leaderboard", out_uri, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == "resnet18"


def test_runs_on_a_uri_resume_predict_and_refuse_a_second_run(s3_comparison, synthetic_sample, tmp_path, caplog):
    prep_uri, out_uri = s3_comparison
    run_uri = f"{out_uri}/models/resnet18"
    config = TrainConfig.from_dict(json.loads(object_store.read_text(f"{run_uri}/{run_layout.CONFIG}"))["train"])
    assert config.out == run_uri and config.data == prep_uri
    with pytest.raises(RunAlreadyComplete, match=run_uri):
        run_training(config)
    images = sorted((synthetic_sample.path / "img_align_celeba").glob("*.jpg"))[:3]
    out_csv = tmp_path / "predictions.csv"
    assert main(["predict", "--model", run_uri, *map(str, images), "--out", str(out_csv)]) == 0
    predictions = pd.read_csv(out_csv)
    assert len(predictions) == 3 and predictions["prob_male"].between(0, 1).all() and predictions["error"].isna().all()
    # A resumed compare reuses the finished model from the bucket instead of searching again.
    caplog.set_level(logging.INFO, logger="tuning")
    from tuning.compare import CompareConfig, run_compare
    from tuning.search import SearchConfig

    table = run_compare(CompareConfig.from_dict({"data": prep_uri, "out": out_uri, "models": ["resnet18"], "resume": True}),
                        SearchConfig.from_dict({"trials": 1, "trial_mode": "train"}),
                        TrainConfig.from_dict({"data": prep_uri, "out": out_uri, "epochs": 1, "batch_size": 32}))
    assert any("already finished" in line for line in caplog.messages) and table.loc[0, "status"] == "ok"
