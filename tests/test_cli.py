"""The command line's contract for errors: the project's own are one line (exit 2), with the
traceback under --debug; anything else is a bug and keeps its traceback. And a table of bad
inputs across the commands, each failing in seconds, before any work, leaving no output behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from PIL import Image

from gendertune.base.errors import GendertuneError, MissingInputError
from gendertune.cli import main
from gendertune.data_prep import layout
from gendertune.models.weights import WEIGHTS_MIRROR_ENV
from gendertune.tuning.compare import leaderboard


def test_a_project_error_is_one_line_and_debug_shows_it_whole(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gendertune leaderboard: error: ") and len(error.strip().splitlines()) == 1
    with pytest.raises(MissingInputError, match="has no leaderboard.csv"):
        main(["--debug", "leaderboard", str(tmp_path / "nothing")])


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(out):
        raise ValueError("a bug, not an input problem")

    monkeypatch.setattr(leaderboard, "read_leaderboard", broken)
    with pytest.raises(ValueError, match="a bug") as raised:
        main(["leaderboard", str(tmp_path)])
    assert not isinstance(raised.value, GendertuneError)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small, real inputs that each case spoils in one way: an image folder with a label CSV, a
    prep output's manifest (validation reads no more of it), a config file per mistake."""
    root = tmp_path_factory.mktemp("bad-inputs")
    images = root / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 40, 90, 90)).save(images / f"{index}.jpg")
    pd.DataFrame({"images": ["0.jpg", "1.jpg", "2.jpg"], "Male": [1, 0, 1]}).to_csv(root / "labels.csv", index=False)
    pd.DataFrame({"images": ["0.jpg"], "gender": [1]}).to_csv(root / "no_male.csv", index=False)
    pd.DataFrame({"images": ["0.jpg", "1.jpg"], "Male": [1, 2]}).to_csv(root / "bad_values.csv", index=False)
    prep = root / "prep"
    prep.mkdir()
    (prep / layout.MANIFEST).write_text(
        json.dumps(
            {
                "format_version": layout.FORMAT_VERSION,
                "attribute": "Male",
                "class_names": ["Female", "Male"],
                "image_size": 32,
                "alignment": None,
                "splits": {"train": {"count": 2}, "test": {"count": 1}},
            }
        )
    )
    for split, rows in (("train", 2), ("test", 1)):  # real shards: open_prepared reads their footers
        (prep / split).mkdir()
        pq.write_table(
            pa.table(
                {
                    "image_id": [f"{i}.jpg" for i in range(rows)],
                    "label": pa.array([1] * rows, pa.int8()),
                    "identity": [-1] * rows,
                    "hash": ["0" * 64] * rows,
                    "pixels": [bytes(32 * 32 * 3)] * rows,
                }
            ),
            prep / split / "part-00000.parquet",
        )
    edited = root / "edited-prep"  # a manifest someone edited by hand
    shutil.copytree(prep, edited)
    (edited / layout.MANIFEST).write_text(json.dumps({"format_version": layout.FORMAT_VERSION, "image_size": 32}))
    truncated = root / "truncated-prep"  # a shard cut short (a full disk, an interrupted copy)
    shutil.copytree(prep, truncated)
    shard = truncated / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])
    broken_run = root / "broken-run"  # an unfinished run of ours whose config.json was damaged
    broken_run.mkdir()
    (broken_run / ".gendertune-output").write_text(json.dumps({"gendertune_output": "train", "format": 1}))
    (broken_run / "config.json").write_text('{"train": ')
    broken_comparison = root / "broken-comparison"  # an interrupted comparison of ours, config.json damaged
    broken_comparison.mkdir()
    (broken_comparison / ".gendertune-output").write_text(json.dumps({"gendertune_output": "compare", "format": 1}))
    (broken_comparison / "config.json").write_text('["compare"]')
    comparison = root / "comparison"
    comparison.mkdir()
    (comparison / "leaderboard.csv").write_text('rank,model\n1,"resnet18\n')
    (root / "header_only.csv").write_text("images,Male\n")
    attributes = "3\n{names}\n0.jpg 1 1\n1.jpg -1 1{extra}\n2.jpg 1 -1\n"
    (root / "attr_twice.txt").write_text(attributes.format(names="Male Male", extra=""))
    (root / "attr_extra_field.txt").write_text(attributes.format(names="Male Smiling", extra=" 1"))
    (root / "attr_latin1.txt").write_bytes(attributes.format(names="Male Souriant\xe9", extra="").encode("latin-1"))
    (root / "latin1.toml").write_bytes("[prep]\n# r\xe9sum\xe9\nimage_size = 64\n".encode("latin-1"))
    old_prep = root / "old-prep"
    old_prep.mkdir()
    (old_prep / layout.MANIFEST).write_text(json.dumps({"format_version": 1}))
    configs = {
        "unknown_key.toml": "[prep]\nimagesize = 64\n",
        "unknown_section.toml": "[preprocessing]\nimage_size = 64\n",
        "bad_domain.toml": '[search.space]\nlr = ["lognormal", 1e-4, 1e-2]\n',
        "bad_constant.toml": "[search.space]\nhflip = 3.0\n",
        "not_toml.toml": "[prep\nimage_size = 64\n",
        "demo_section.toml": "[demo]\nepochs = 3\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    unfinished = root / "unfinished"  # a run killed after model.pt, before metrics.json
    unfinished.mkdir()
    (unfinished / "model.pt").write_bytes(b"half a model")
    webapp = root / "webapp"  # a folder that happens to hold a manifest.json
    (webapp / "assets").mkdir(parents=True)
    for name in ("manifest.json", "index.html", "assets/app.js"):
        (webapp / name).write_text(name)
    return root


def tree_hashes(root) -> dict[str, str]:
    """Every file's SHA-256 and every folder (as "folder"), by path: a new, changed or removed file
    or folder (a lock, a staging folder) changes it. FIFOs are listed, never read."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        if p.is_dir()
        else "special"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def web_server():
    """A plain HTTP server that is not Ray's dashboard (every path: 404)."""
    import http.server
    import threading

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):  # the error line under test is the only stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


TRAIN = ["train", "--data", "{root}/prep", "--out", "{out}", "--model", "resnet18"]
COMPARE = ["compare", "--data", "{root}/prep", "--out", "{out}", "--models", "resnet18"]
CASES = {
    "prep: no data folder": (["prep", "--data", "{root}/nowhere", "--out", "{out}"], "nowhere does not exist"),
    "prep: no label file": (["prep", "--data", "{root}/images", "--out", "{out}"], "0 CSV files; pass --labels FILE"),
    "prep: label column missing": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/no_male.csv", "--out", "{out}"],
        "no_male.csv: no attribute column 'Male'",
    ),
    "prep: label values": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/bad_values.csv", "--out", "{out}"],
        "values other than 0/1 or -1/1",
    ),
    "prep: ratios": (["prep", "--data", "{root}/images", "--ratios", "0.5,0.2", "--out", "{out}"], "sum to 1"),
    "prep: out inside the images": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/labels.csv", "--out", "{root}/images/out"],
        "inside the image folder",
    ),
    "config: unknown key": (
        ["prep", "--config", "{root}/unknown_key.toml", "--data", "{root}/images", "--out", "{out}"],
        "imagesize",
    ),
    "config: unknown section": (
        ["prep", "--config", "{root}/unknown_section.toml", "--data", "{root}/images", "--out", "{out}"],
        "unknown section(s) preprocessing",
    ),
    "config: a [demo] section (nothing reads it)": (
        ["compare", "--config", "{root}/demo_section.toml", "--data", "{root}/prep", "--out", "{out}"],
        "unknown section(s) demo",
    ),
    "config: not TOML": (
        ["prep", "--config", "{root}/not_toml.toml", "--data", "{root}/images", "--out", "{out}"],
        "is not valid TOML",
    ),
    "train: hflip out of range": ([*TRAIN, "--augment", "hflip=2"], "train.hflip is a probability in [0, 1]"),
    "train: negative rotation": ([*TRAIN, "--augment", "rotation=-5"], "train.rotation must be in [0, 180]"),
    "train: crop of 1": ([*TRAIN, "--augment", "random_resized_crop=1.0"], "train.random_resized_crop"),
    "train: lr": ([*TRAIN, "--lr", "0"], "train.lr: must be in (0, 10)"),
    "train: not a prep output": (["train", "--data", "{root}/images", "--out", "{out}"], "is not a prepared dataset"),
    "train: prep of another version": (
        ["train", "--data", "{root}/old-prep", "--out", "{out}"],
        "format version 1 is not",
    ),
    "train: unknown model": (
        ["train", "--data", "{root}/prep", "--out", "{out}", "--model", "resnet9000"],
        "unknown model 'resnet9000'",
    ),
    "train: no ImageNet weights, offline": (
        [*TRAIN, "--pretrained"],
        "are not in the torch hub cache and could not be downloaded",
    ),
    "train: weights file missing": ([*TRAIN, "--weights", "{root}/none.pt"], "none.pt does not exist"),
    "train: eval set spec": ([*TRAIN, "--eval-set", "{root}/images"], "expected NAME=DIR"),
    "train: eval set without labels": ([*TRAIN, "--eval-set", "faces={root}/prep"], "found 0 CSV files"),
    "compare: a model twice": ([*COMPARE[:-1], "resnet18,resnet18"], "names a model twice"),
    "compare: unknown model": ([*COMPARE[:-1], "resnet18,resnet9000"], "unknown model 'resnet9000'"),
    "compare: ensemble of one": ([*COMPARE, "--ensemble-k", "1"], "compare.ensemble_k"),
    "compare: bad search space": ([*COMPARE, "--config", "{root}/bad_domain.toml"], "search.space.lr"),
    "compare: bad search constant": ([*COMPARE, "--config", "{root}/bad_constant.toml"], "hflip is a probability"),
    "train: image too small for the model": ([*TRAIN[:-1], "vgg19", "--image-size", "16"], "too small for vgg19"),
    "make-sample: too few images": (["make-sample", "--n", "3", "--out", "{out}"], "n=3 is too small"),
    "predict: not a run": (["predict", "--run", "{root}/prep", "{root}/images"], "has no model.pt"),
    "predict: an unfinished run": (
        ["predict", "--run", "{root}/unfinished", "{root}/images"],
        "is not a finished training run (no metrics.json)",
    ),
    # Data loss (issue 21): outputs that would replace the user's files.
    "predict: --annotate into the photos' own folder": (
        ["predict", "--run", "{root}/prep", "{root}/images", "--annotate", "{root}/images"],
        "--annotate would overwrite",
    ),
    "predict: --out is an input photo": (
        ["predict", "--run", "{root}/prep", "{root}/images/0.jpg", "--out", "{root}/images/0.jpg"],
        "is an image (or one of the inputs)",
    ),
    "predict: --out is a folder": (
        ["predict", "--run", "{root}/prep", "{root}/images", "--out", "{root}/images"],
        "is a folder; name the CSV file",
    ),
    "prep: --overwrite a folder that holds a manifest.json": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/labels.csv", "--out", "{root}/webapp", "--overwrite"],
        "not a finished gendertune prep output",
    ),
    "train: --out a folder of the user's files": (
        ["train", "--data", "{root}/prep", "--out", "{root}/images"],
        "not a gendertune train output",
    ),
    "train: --out under a file": (["train", "--data", "{root}/prep", "--out", "{root}/labels.csv"], "is a file"),
    "train: eval set named like a split": ([*TRAIN, "--eval-set", "test={root}/images"], "one of the run's own splits"),
    "train: eval set named like a split, other case": (
        [*TRAIN, "--eval-set", "Val={root}/images"],
        "one of the run's own",
    ),
    # Broken runs (issue 21): settings that passed validation and failed, or trained NaN, later.
    "train: NaN weight decay": ([*TRAIN, "--weight-decay", "nan"], "train.weight_decay: must be a finite number"),
    "train: NaN warmup": ([*TRAIN, "--warmup-epochs", "nan"], "train.warmup_epochs: must be a finite number"),
    "train: infinite grad clip": ([*TRAIN, "--grad-clip", "inf"], "train.grad_clip: must be a finite number"),
    "train: NaN CPUs per worker": ([*TRAIN, "--cpus-per-worker", "nan"], "train.cpus_per_worker: must be a finite"),
    "prep: negative seed": (
        ["prep", "--data", "{root}/images", "--seed", "-1", "--out", "{out}"],
        "prep.seed: must be in",
    ),
    "prep: NaN face score": (
        ["prep", "--data", "{root}/images", "--face-min-score", "nan", "--out", "{out}"],
        "prep.face_min_score: must be a finite number",
    ),
    "compare: NaN time budget": ([*COMPARE, "--time-budget-s", "nan"], "search.time_budget_s: must be a finite number"),
    "evaluate: not a run": (
        ["evaluate", "--run", "{root}/prep", "--eval-set", "faces={root}/images"],
        "is not a finished training run",
    ),
    "leaderboard: no comparison": (["leaderboard", "{root}/prep"], "has no leaderboard.csv"),
    # Input files (issue 21): each found before any image is hashed or Ray starts.
    "prep: a label CSV with no rows": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/header_only.csv", "--out", "{out}"],
        "a header and no rows",
    ),
    "prep: an attribute named twice": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/attr_twice.txt", "--out", "{out}"],
        "names the attribute(s) Male more than once",
    ),
    "prep: an attribute row with an extra field": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/attr_extra_field.txt", "--out", "{out}"],
        "every row must be an image name and 2 values",
    ),
    "prep: a non-UTF-8 attribute file": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/attr_latin1.txt", "--out", "{out}"],
        "not UTF-8 text",
    ),
    "config: not UTF-8": (
        ["prep", "--config", "{root}/latin1.toml", "--data", "{root}/images", "--out", "{out}"],
        "is not UTF-8 text",
    ),
    "prep: --out under a file": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/labels.csv", "--out", "{root}/labels.csv/out"],
        "is a file, not a folder",
    ),
    # /proc/sys is read-only to every user, root included (os.access says so), on any Linux.
    "prep: --out on a read-only file system": (
        ["prep", "--data", "{root}/images", "--labels", "{root}/labels.csv", "--out", "/proc/sys/gendertune-out"],
        "is not writable",
    ),
    "train: --out on a read-only file system": (
        ["train", "--data", "{root}/prep", "--out", "/proc/sys/gendertune-run"],
        "is not writable",
    ),
    "train: an edited manifest.json": (
        ["train", "--data", "{root}/edited-prep", "--out", "{out}"],
        "missing or malformed attribute, class_names, splits",
    ),
    "train: a truncated Parquet shard": (
        ["train", "--data", "{root}/truncated-prep", "--out", "{out}"],
        "is not a readable Parquet file",
    ),
    "train: --out holds a damaged config.json": (
        ["train", "--data", "{root}/prep", "--out", "{root}/broken-run", "--model", "resnet18"],
        "config.json is not valid JSON",
    ),
    "compare: --resume where config.json is damaged": (
        ["compare", "--data", "{root}/prep", "--out", "{root}/broken-comparison", "--models", "resnet18", "--resume"],
        "config.json does not hold a comparison's settings",
    ),
    "make-sample: no images": (["make-sample", "--out", "{out}", "--n", "0"], "n must be >= 1"),
    "make-sample: into a folder with files": (["make-sample", "--out", "{root}/images"], "not an empty folder"),
    "leaderboard: a corrupt leaderboard.csv": (["leaderboard", "{root}/comparison"], "is not a readable CSV"),
    "leaderboard: a corrupt leaderboard.csv, as html": (
        ["leaderboard", "{root}/comparison", "--format", "html"],
        "is not a readable CSV",
    ),
    # Cluster commands (issue 21): addresses that are not a Ray cluster.
    "jobs: nothing listens at the address": (
        ["jobs", "list", "--address", "http://127.0.0.1:{closed_port}"],
        "no Ray cluster answers at",
    ),
    "jobs: a web server that is not Ray": (
        ["jobs", "status", "x", "--address", "{web_server}"],
        "is not a Ray dashboard",
    ),
    "submit: a web server that is not Ray": (
        ["submit", "--address", "{web_server}", "--", "leaderboard", "x"],
        "is not a Ray dashboard",
    ),
    "submit: nothing listens at the address": (
        ["submit", "--address", "http://127.0.0.1:{closed_port}", "--", "leaderboard", "x"],
        "no Ray cluster answers at",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_fast_in_one_line_and_leaves_nothing(case, inputs, web_server, tmp_path, capsys, monkeypatch):
    template, expected = CASES[case]
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, f"http://127.0.0.1:{free_port()}")  # offline, even where CI is not
    out = tmp_path / "out"
    args = [arg.format(root=inputs, out=out, closed_port=free_port(), web_server=web_server) for arg in template]
    before = tree_hashes(inputs)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    started = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - started
    error = capsys.readouterr().err.strip()
    assert code == 2, error
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert expected in error, error
    assert seconds < 10, f"{case} took {seconds:.1f}s to fail"
    assert not out.exists() and not (inputs / "images" / "out").exists()
    assert tree_hashes(inputs) == before, "the user's files changed"
    assert not list(tmp_path.iterdir()), f"{case} left {sorted(p.name for p in tmp_path.iterdir())}"
    # Checked before heavy work: run alone (pytest -m unit), no case may start Ray.
    assert ray_was_up or not ("ray" in sys.modules and sys.modules["ray"].is_initialized()), f"{case} started Ray"


def test_more_workers_than_the_cluster_holds_fails_in_seconds(inputs, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    cpus = int(ray_session.cluster_resources()["CPU"])
    started = time.perf_counter()
    assert main(["train", "--data", str(inputs / "prep"), "--out", str(out), "--workers", str(cpus)]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{cpus} workers x 1 CPUs need {cpus} CPUs plus 1 for data loading; the cluster has {cpus}" in error, error
    assert time.perf_counter() - started < 10 and not out.exists()


def test_predict_and_evaluate_take_run_and_model_is_a_deprecated_alias(inputs, capsys):
    assert main(["predict", "--model", str(inputs / "prep"), str(inputs / "images")]) == 2
    deprecation, error = capsys.readouterr().err.strip().splitlines()
    assert "--model is deprecated here" in deprecation and "use --run" in deprecation
    assert "has no model.pt" in error
    with pytest.raises(SystemExit):  # one run, named once
        main(["evaluate", "--run", "a", "--model", "b", "--eval-set", "x=y"])
