"""gendertune.cluster.storage: one API for local folders and object-store URIs, tried on both (the object
store is a real S3 protocol: a local moto server); prep writes its shards to a URI, compare's Tune
and Train state and its leaderboard go there, predict and `leaderboard` read from there, and the
completion markers each stage names are only ever uploaded last."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import prep_sample

from gendertune.base.errors import MissingInputError
from gendertune.cli import main
from gendertune.cluster import storage
from gendertune.cluster.storage import OutputExistsError
from gendertune.data_prep.layout import MANIFEST, open_prepared
from gendertune.tuning.compare import leaderboard
from gendertune.tuning.compare import run as compare
from gendertune.tuning.evaluate import run_layout
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.run import run_training


def test_uri_detection_and_joining():
    assert storage.is_uri("s3://bucket/run") and storage.is_uri("gs://b/x")
    assert not storage.is_uri("/tmp/run") and not storage.is_uri("file:///tmp/run")
    assert not storage.is_uri("runs/a://b") and not storage.is_uri(None)
    assert storage.join("s3://bucket/run/", "models", "/resnet18") == "s3://bucket/run/models/resnet18"
    assert storage.join("/tmp/run", "models") == "/tmp/run/models"


def test_completion_markers_upload_last_inner_folders_first():
    order = storage.upload_order(
        [
            "leaderboard.csv",
            "models/a/metrics.json",
            "models/a/history.csv",
            "config.json",
            "models/a/model.pt",
            "leaderboard.json",
        ],
        markers=compare.COMPLETION_MARKERS,
    )
    assert order[:3] == ["models/a/history.csv", "models/a/model.pt", "config.json"]
    assert order[3] == "models/a/metrics.json" and set(order[4:]) == {"leaderboard.csv", "leaderboard.json"}


def test_an_unknown_scheme_gets_a_clear_error():
    with pytest.raises(storage.StorageURIError, match="nosuchscheme://x/y: cannot open this storage URI"):
        storage.is_file("nosuchscheme://x/y")


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """An empty location: a local folder, or a fresh prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/api/{uuid.uuid4().hex[:8]}"


def test_the_same_calls_read_write_and_list_a_folder_and_an_object_store(location):
    assert storage.absolute(location + "/") == location
    storage.write_bytes(storage.join(location, "notes", "a.txt"), b"hello")
    storage.write_bytes(storage.join(location, "b.bin"), bytes(range(256)))
    shard = storage.join(location, "train", "part-00000.parquet")
    with storage.open_output(shard) as stream:
        pq.write_table(pa.table({"image_id": ["x", "y"]}), stream)
    assert storage.list_files(location) == ["b.bin", "notes/a.txt", "train/part-00000.parquet"]
    assert storage.list_files(storage.join(location, "notes")) == ["a.txt"]
    assert storage.list_files(storage.join(location, "nothing-here")) == []
    assert storage.read_text(storage.join(location, "notes", "a.txt")) == "hello"
    assert storage.read_bytes(storage.join(location, "b.bin")) == bytes(range(256))
    filesystem, path = storage.resolve(shard)
    assert pq.read_table(path, filesystem=filesystem)["image_id"].to_pylist() == ["x", "y"]
    assert storage.is_file(storage.join(location, "b.bin"))
    assert not storage.is_file(storage.join(location, "notes")) and not storage.is_file(storage.join(location, "c.txt"))
    missing = storage.join(location, "c.txt")
    with pytest.raises(MissingInputError, match=re.escape(f"{missing} does not exist")):
        storage.read_bytes(missing)
    storage.delete_tree(storage.join(location, "notes"))
    assert storage.list_files(location) == ["b.bin", "train/part-00000.parquet"]


def test_a_relative_path_and_a_file_uri_name_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("out/run/config.json", b"{}")
    assert storage.absolute("out/run") == str(Path.cwd() / "out" / "run")
    assert storage.absolute(f"file://{Path.cwd()}/out") == str(Path.cwd() / "out")
    assert storage.list_files(f"file://{Path.cwd()}/out") == ["run/config.json"]
    assert storage.read_text(tmp_path / "out" / "run" / "config.json") == "{}"


def test_metrics_json_is_an_ordinary_file_unless_the_caller_names_it_a_marker():
    order = storage.upload_order(["DONE", "a/DONE", "a/metrics.json", "manifest.json", "b.txt"], markers={"DONE"})
    assert order == ["a/metrics.json", "b.txt", "manifest.json", "a/DONE", "DONE"]


@contextlib.contextmanager
def uploads_to(uri: str):
    """The objects below `uri` that became visible inside the block, in the order the S3 server
    made them so (a single PUT, or the completion of a multipart upload), read from moto's recorder."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]

    def recorder(action: str, method: str = "POST") -> str:
        request = urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method=method)
        return urllib.request.urlopen(request).read().decode()

    recorder("reset-recording")
    recorder("start-recording")
    uploads: list[str] = []
    try:
        yield uploads
    finally:
        recorder("stop-recording")
    prefix = urllib.parse.urlparse(uri.replace("s3://", "http://host/", 1)).path.rstrip("/") + "/"
    for line in recorder("download-recording", "GET").splitlines():
        entry = json.loads(line)
        url = urllib.parse.urlparse(entry["url"])
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        path = urllib.parse.unquote(url.path)
        made_visible = (entry["method"] == "PUT" and not {"uploadId", "partNumber"} & query.keys()) or (
            entry["method"] == "POST" and "uploadId" in query
        )
        # Keys ending in "/" are the empty folder objects pyarrow leaves when it deletes a folder's last file.
        if made_visible and path.startswith(prefix) and not path.endswith("/"):
            uploads.append(path.removeprefix(prefix))


def _write_files(folder: Path, relatives: list[str]) -> None:
    for relative in relatives:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(relative)


def test_the_markers_the_stage_names_are_uploaded_last_inner_folders_first(s3_bucket):
    # Marker names no stage uses: the storage layer takes them from its caller, knows none itself.
    files = ["DONE.flag", "inner/DONE.flag", "inner/a.txt", "metrics.json", "z.txt"]
    uri = f"{s3_bucket}/unit/invented-markers"
    with uploads_to(uri) as uploads:
        with storage.output_location(uri, stage="train", markers={"DONE.flag"}) as location:
            _write_files(location.local, files)
    # The ownership marker first (the prefix is claimed before anything is written), the stage's markers last.
    assert uploads == [storage.OUTPUT_MARKER, "inner/a.txt", "metrics.json", "z.txt", "inner/DONE.flag", "DONE.flag"]
    uri = f"{s3_bucket}/unit/invented-marker-fresh"
    with uploads_to(uri) as uploads:
        with storage.fresh_output(uri, stage="prep", marker="READY") as location:
            _write_files(location.local, ["READY", "data/part.bin", "notes.txt"])
    assert uploads == [storage.IN_PROGRESS, storage.OUTPUT_MARKER, "data/part.bin", "notes.txt", "READY"]
    assert storage.list_files(uri) == [storage.OUTPUT_MARKER, "READY", "data/part.bin", "notes.txt"]


def test_output_location_uploads_what_a_failed_stage_wrote_but_no_marker(s3_bucket):
    uri = f"{s3_bucket}/unit/stopped-run"
    with pytest.raises(RuntimeError, match="stopped"):
        with storage.output_location(uri, stage="train", markers=[run_layout.METRICS]) as location:
            (location.local / "config.json").write_text("{}")
            raise RuntimeError("stopped")
    assert storage.list_files(uri) == [storage.OUTPUT_MARKER, "config.json"]  # claimed as train's when found empty
    # The next attempt starts from what is there (a resume compares configs with it).
    with storage.output_location(uri, stage="train", markers=[run_layout.METRICS]) as location:
        assert (location.local / "config.json").read_text() == "{}"
        (location.local / "metrics.json").write_text("{}")
    assert storage.list_files(uri) == [storage.OUTPUT_MARKER, "config.json", "metrics.json"]


def test_a_resumable_uri_output_refuses_a_prefix_of_the_users_objects(s3_bucket):
    uri = f"{s3_bucket}/unit/users-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(f"{uri}/photo.jpg", b"the user's photo")
    for stage in ("train", "compare"):
        with pytest.raises(OutputExistsError, match=f"not a gendertune {stage} output"):
            with storage.output_location(uri, stage=stage, markers=[run_layout.METRICS]):
                pass
    assert storage.list_files(uri) == ["photo.jpg"] and storage.read_bytes(f"{uri}/photo.jpg") == b"the user's photo"
    # Another stage's output is refused too: a train never resumes into a comparison.
    compare_uri = f"{s3_bucket}/unit/cmp-{uuid.uuid4().hex[:8]}"
    with storage.output_location(compare_uri, stage="compare", markers=["leaderboard.csv"]):
        pass
    with pytest.raises(OutputExistsError, match="not a gendertune train output"):
        with storage.output_location(compare_uri, stage="train", markers=[run_layout.METRICS]):
            pass


def test_prep_to_a_uri_is_never_complete_half_way_and_refuses_foreign_objects(s3_bucket, ray_session, synthetic_sample):
    uri = f"{s3_bucket}/unit/prep-interrupted"
    with pytest.raises(KeyboardInterrupt):
        with storage.fresh_output(uri, stage="prep", marker=MANIFEST) as location:
            storage.write_bytes(storage.join(location.storage, "train", "part-00000.parquet"), b"x")
            raise KeyboardInterrupt
    left = storage.list_files(uri)
    assert MANIFEST not in left and storage.IN_PROGRESS in left
    with pytest.raises(Exception, match="not a prepared dataset"):
        open_prepared(uri)
    # A re-run clears its own interrupted attempt and finishes.
    prep_sample(synthetic_sample, uri, image_size=32)
    files = storage.list_files(uri)
    assert MANIFEST in files and storage.IN_PROGRESS not in files and "train/part-00000.parquet" in files
    foreign = f"{s3_bucket}/unit/someone-elses"
    storage.write_bytes(f"{foreign}/notes.txt", b"mine")
    with pytest.raises(OutputExistsError, match="not a gendertune prep output"):
        prep_sample(synthetic_sample, foreign, image_size=32)
    assert storage.read_text(f"{foreign}/notes.txt") == "mine"


@pytest.fixture(scope="module")
def s3_comparison(s3_bucket, ray_session, synthetic_sample):
    """prep -> compare (TorchTrainer trials) with --data and --out both on S3."""
    prep_uri, out_uri = f"{s3_bucket}/e2e/prep", f"{s3_bucket}/e2e/cmp"
    prep_sample(synthetic_sample, prep_uri, image_size=32, split="identity", ratios=[0.6, 0.2, 0.2])
    assert (
        main(
            [
                "compare",
                "--data",
                prep_uri,
                "--out",
                out_uri,
                "--models",
                "resnet18",
                "--trials",
                "1",
                "--epochs",
                "1",
                "--trial-mode",
                "train",
                "--batch-size",
                "32",
            ]
        )
        == 0
    )
    return prep_uri, out_uri


def test_compare_writes_its_leaderboard_runs_and_checkpoints_to_the_uri(s3_comparison, capsys):
    _, out_uri = s3_comparison
    files = storage.list_files(out_uri)
    for name in (
        leaderboard.CSV,
        leaderboard.JSON,
        leaderboard.MD,
        "config.json",
        f"models/resnet18/{run_layout.METRICS}",
        f"models/resnet18/{run_layout.MODEL}",
    ):
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
    config = TrainConfig.from_dict(json.loads(storage.read_text(f"{run_uri}/{run_layout.CONFIG}"))["train"])
    assert config.out == run_uri and config.data == prep_uri
    # A compare's model folder is the compare's output: a train never writes into it, as with a folder.
    with pytest.raises(OutputExistsError, match=f"{run_uri} holds objects and is not a gendertune train output"):
        run_training(config)
    images = sorted((synthetic_sample.path / "img_align_celeba").glob("*.jpg"))[:3]
    out_csv = tmp_path / "predictions.csv"
    assert main(["predict", "--run", run_uri, *map(str, images), "--out", str(out_csv)]) == 0
    predictions = pd.read_csv(out_csv)
    assert len(predictions) == 3 and predictions["prob_male"].between(0, 1).all() and predictions["error"].isna().all()
    # A resumed compare reuses the finished model from the bucket instead of searching again.
    caplog.set_level(logging.INFO, logger="gendertune")
    from gendertune.tuning.compare.config import CompareConfig
    from gendertune.tuning.compare.run import run_compare
    from gendertune.tuning.search.config import SearchConfig

    table = run_compare(
        CompareConfig.from_dict({"data": prep_uri, "out": out_uri, "models": ["resnet18"], "resume": True}),
        SearchConfig.from_dict({"trials": 1, "trial_mode": "train"}),
        TrainConfig.from_dict({"data": prep_uri, "out": out_uri, "epochs": 1, "batch_size": 32}),
    )
    assert any("already finished" in line for line in caplog.messages) and table.loc[0, "status"] == "ok"


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_overwrite_replaces_only_a_folder_with_our_marker_not_any_manifest_json(tmp_path):
    web_app = tmp_path / "site"
    (web_app / "assets").mkdir(parents=True)
    for name in ("manifest.json", "index.html", "assets/app.js"):
        (web_app / name).write_text(name)
    before = _hashes(web_app)
    with pytest.raises(OutputExistsError, match="not a finished gendertune prep output"):
        with storage.atomic_output_dir(web_app, stage="prep", marker=MANIFEST, overwrite=True):
            pass
    assert _hashes(web_app) == before
    # A marker of another stage, or one in another format, is not ours either.
    (web_app / storage.OUTPUT_MARKER).write_text(json.dumps({"gendertune_output": "prep", "format": 99}))
    with pytest.raises(OutputExistsError):
        with storage.atomic_output_dir(web_app, stage="prep", marker=MANIFEST, overwrite=True):
            pass
    ours = tmp_path / "prep"
    with storage.atomic_output_dir(ours, stage="prep", marker=MANIFEST) as staging:
        (staging / MANIFEST).write_text("{}")
    with storage.atomic_output_dir(ours, stage="prep", marker=MANIFEST, overwrite=True) as staging:
        (staging / MANIFEST).write_text('{"second": 1}')
    assert (ours / MANIFEST).read_text() == '{"second": 1}' and storage.output_stage(ours) == "prep"


def test_a_resumable_output_refuses_a_folder_of_the_users_files(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(OutputExistsError, match="not a gendertune train output"):
        with storage.output_location(str(photos), stage="train", markers=[run_layout.METRICS]):
            pass
    with pytest.raises(OutputExistsError, match="is a file"):
        with storage.output_location(str(photos / "a.jpg"), stage="train", markers=[run_layout.METRICS]):
            pass
    assert _hashes(photos) == {"a.jpg": _hashes(photos)["a.jpg"]} and len(list(photos.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with storage.output_location(str(empty), stage="train", markers=[run_layout.METRICS]) as location:
        storage.claim_folder(location.local, "train")
    with storage.output_location(str(empty), stage="train", markers=[run_layout.METRICS]):
        pass  # our own folder: a resume
    with pytest.raises(OutputExistsError, match="not a gendertune compare output"):
        with storage.output_location(str(empty), stage="compare", markers=[run_layout.METRICS]):
            pass


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path):
    import signal
    import subprocess
    import sys

    final = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from gendertune.cluster.storage import atomic_output_dir\n"
                "with atomic_output_dir(sys.argv[1], stage='prep', marker='manifest.json'):\n"
                "    print('writing', flush=True)\n"
                "    time.sleep(120)\n"
            ),
            str(final),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "writing"
        for enter in (
            lambda: storage.atomic_output_dir(final, stage="prep", marker=MANIFEST, overwrite=True),
            lambda: storage.output_location(str(final), stage="prep", markers=[MANIFEST]),
        ):
            with pytest.raises(storage.OutputBusyError, match="being written by another gendertune run"):
                with enter():
                    pass
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its lock; no cleanup code runs
        holder.wait(timeout=10)
    with storage.atomic_output_dir(final, stage="prep", marker=MANIFEST) as staging:
        (staging / MANIFEST).write_text("{}")
    assert (final / MANIFEST).is_file() and not list(tmp_path.glob(".out.lock"))


def test_a_second_writer_of_a_uri_is_refused_while_the_first_holds_its_lease(s3_bucket):
    import threading
    import time

    uri = f"{s3_bucket}/unit/leased-{uuid.uuid4().hex[:8]}"
    lease = storage.lease_location(uri)
    with storage.exclusive_uri(uri):
        assert storage.is_file(lease) and not storage.list_files(uri)  # a sibling, not one of the output's objects
        for enter in (
            lambda: storage.output_location(uri, stage="train", markers=[run_layout.METRICS]),
            lambda: storage.fresh_output(uri, stage="prep", marker=MANIFEST),
        ):
            with pytest.raises(storage.OutputBusyError, match="being written by another gendertune run"):
                with enter():
                    pass
    assert not storage.is_file(lease)  # released with the block

    # A holder that died leaves a lease nobody renews: once it is LEASE_S old, the next run takes over.
    storage.write_bytes(lease, json.dumps({"token": "dead", "holder": "h pid 1", "renewed_at": 0}).encode())
    with storage.output_location(uri, stage="train", markers=[run_layout.METRICS]) as location:
        (location.local / "config.json").write_text("{}")
    assert storage.list_files(uri) == [storage.OUTPUT_MARKER, "config.json"] and not storage.is_file(lease)

    # A live holder renews its lease, so a long run keeps it.
    with storage.exclusive_uri(uri, lease_s=0.9, settle_s=0.1):
        time.sleep(1.5)
        assert time.time() - json.loads(storage.read_text(lease))["renewed_at"] < 0.9
        with pytest.raises(storage.OutputBusyError):
            with storage.exclusive_uri(uri, lease_s=0.9, settle_s=0.1):
                pass

    # Two runs that start at the same moment: exactly one gets the output.
    start, outcomes = threading.Barrier(2), []

    def writer() -> None:
        start.wait()
        try:
            with storage.exclusive_uri(uri, settle_s=0.5):
                outcomes.append("held")
                time.sleep(0.5)
        except storage.OutputBusyError:
            outcomes.append("refused")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held", "refused"]
