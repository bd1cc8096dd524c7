"""Shared fixtures: an isolated HOME, one Ray session for the whole run, a generated sample, a
local S3-compatible server (moto) for the object-store tests, and what the models tests
(test_registry, test_weights, test_transforms) share: one intra-op thread, a ViT and ImageNet's
mean/std.

HOME is pointed at a temporary folder before Ray is imported anywhere, so Ray's token file
(~/.ray/auth_token) and torch's hub cache are the tests' own and never a user's.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="gendertune-test-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, timeout: float, *, interval: float = 1.0) -> None:
    """Poll `condition()` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# A user's `gendertune` command, run by this interpreter (the installed script may be another's).
GENDERTUNE = (sys.executable, "-m", "gendertune.cli")


# A line Ray forwards to the driver's console from a worker process, "(RayTrainWorker pid=12)" or
# "(pid=12, ip=10.0.0.2)" first (coloured when Ray colours it), and such a line of the project's.
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+(, ip=[\d.]+)?\)(\x1b\[0m)? ")
PROJECT_WORKER_LINE = re.compile(RAY_PREFIX.pattern + r"\[gendertune\] ")


@contextlib.contextmanager
def whole_console(log: Path):
    """Everything this process prints in the block, to `log`: Python's writes (the driver prints
    the workers' lines through sys.stdout/sys.stderr, looked up per line) and what C++ code (Ray's
    core worker in this process) writes to file descriptors 1 and 2 past Python."""
    python = io.StringIO()
    with open(log, "wb") as native:
        saved = [os.dup(fd) for fd in (1, 2)]
        for fd in (1, 2):
            os.dup2(native.fileno(), fd)
        try:
            with contextlib.redirect_stdout(python), contextlib.redirect_stderr(python):
                yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
    log.write_text(python.getvalue() + log.read_text(errors="replace"))


# The S3 endpoint the object-store tests start (s3_bucket). Set before any Ray starts, because
# Ray's workers take their environment from the driver that started the cluster.
S3_PORT = free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "gendertune-test",
        "AWS_SECRET_ACCESS_KEY": "gendertune-test",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """Each test gets one marker: `cluster` (the two-node cluster of test_cluster.py),
    `integration` (it needs Ray: the session's `ray_session`, directly or through a fixture; or
    it says so itself because it trains a real network for seconds) or `unit` (no Ray, quick), so
    `pytest -m unit` is the quick loop and `make test` runs all."""
    for item in items:
        if item.get_closest_marker("integration"):
            continue
        if item.path.name == "test_cluster.py" and "cluster" in item.fixturenames:
            item.add_marker(pytest.mark.cluster)
        elif "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it; startup costs seconds, so share it."""
    import ray

    from gendertune.cluster.runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


# ImageNet's normalisation, which every model spec uses (test_registry, test_transforms).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """The models tests' tensors are tiny, so extra intra-op threads only add OpenMP
    synchronisation, which on CPUs shared with other jobs made those tests several times slower.
    The models test files use it for the whole module (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit_min_size():
    """ViT-B/16 (86M parameters) at its smallest size, built once per module that uses it."""
    import torch

    from gendertune.models import build_model, get_spec

    torch.manual_seed(0)
    return build_model("vit_b_16", num_classes=2, image_size=get_spec("vit_b_16").min_input_size)


@pytest.fixture(scope="session")
def synthetic_sample(tmp_path_factory):
    """A 240-image SYNTHETIC CelebA-layout sample with planted duplicates and a corrupt file."""
    from gendertune.data_prep.synthetic import make_sample

    root = tmp_path_factory.mktemp("sample") / "celeba"
    summary = make_sample(root, n=240, seed=0)
    return summary


@pytest.fixture(scope="session")
def synthetic_sample_large(tmp_path_factory):
    """A 600-image SYNTHETIC sample: enough for a small CNN to learn in a few epochs."""
    from gendertune.data_prep.synthetic import make_sample

    root = tmp_path_factory.mktemp("sample-large") / "celeba"
    return make_sample(root, n=600, seed=1)


def prep_sample(sample, out, **settings):
    """Run the prep stage on a generated sample quietly; returns the output folder. The drawn faces
    are framed at zoom 1, as the demo frames them: the training tests' thresholds were set there, and
    the default 1.4 is for real photos' tight crops (test_prep_config checks the default itself)."""
    from gendertune.data_prep.config import PrepConfig
    from gendertune.data_prep.pipeline import run_prep

    run_prep(PrepConfig.from_dict({"data": str(sample.path), "out": str(out), "face_zoom": 1.0, **settings}))
    return out


@pytest.fixture(scope="session")
def eval_set_folder(tmp_path_factory):
    """A labelled folder the way users bring one (gendertune.tuning.evaluate.eval_sets): images/ and labels.csv with
    image_id, Male and two group columns (a numeric age, a category), drawn from another SYNTHETIC
    sample (so other people than the training sample's), its one corrupt image included."""
    import numpy as np
    import pandas as pd

    from gendertune.data_prep.synthetic import make_sample

    source = make_sample(tmp_path_factory.mktemp("eval-source") / "celeba", n=80, seed=7)
    folder = tmp_path_factory.mktemp("eval-set") / "faces"
    (folder / "images").mkdir(parents=True)
    attributes = pd.read_csv(source.path / "list_attr_celeba.txt", sep=r"\s+", skiprows=1)
    rng = np.random.default_rng(7)
    rows = []
    images = [i for i in sorted((source.path / "img_align_celeba").iterdir()) if i.name not in source.corrupt_ids][:59]
    images += [source.path / "img_align_celeba" / name for name in source.corrupt_ids]  # one
    for image in images:
        shutil.copy(image, folder / "images" / image.name)
        rows.append(
            {
                "image_id": image.name,
                "Male": int(attributes.loc[image.name, "Male"] == 1),
                "age": int(rng.integers(18, 80)),
                "group": "ab"[len(rows) % 2],
            }
        )
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a local moto S3 server at AWS_ENDPOINT_URL; yields its s3:// URI."""
    # The request recorder (test_storage reads the order of uploads from it) writes here, not in the cwd.
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_RECORDER_FILEPATH": os.path.join(_HOME, "moto-recording.jsonl")},
    )

    def bucket_created() -> bool:
        if server.poll() is not None:
            raise RuntimeError("the moto S3 server exited at start-up")
        try:
            # moto needs no signature to create a bucket; pyarrow won't create one by default.
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{S3_PORT}/gendertune-test", method="PUT"))
            return True
        except OSError:
            return False

    try:
        wait_for(bucket_created, "the moto S3 server", 30, interval=0.2)
        yield "s3://gendertune-test"
    finally:
        server.terminate()
        server.wait(timeout=10)
