"""Shared fixtures: an isolated HOME, one Ray session for the whole run, a generated sample, and
a local S3-compatible server (moto) for the object-store tests.

HOME is pointed at a temporary folder before Ray is imported anywhere, so Ray's token file
(~/.ray/auth_token) and torch's hub cache are the tests' own and never a user's.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

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


# The S3 endpoint the object-store tests start (s3_bucket). Set before any Ray starts, because
# Ray's workers take their environment from the driver that started the cluster.
S3_PORT = free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "gendertune-test",
                   "AWS_SECRET_ACCESS_KEY": "gendertune-test", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it; startup costs seconds, so share it."""
    import ray

    from cluster.runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_sample(tmp_path_factory):
    """A 240-image SYNTHETIC CelebA-layout sample with planted duplicates and a corrupt file."""
    from data_prep.synthetic import make_sample

    root = tmp_path_factory.mktemp("sample") / "celeba"
    summary = make_sample(root, n=240, seed=0)
    return summary


@pytest.fixture(scope="session")
def synthetic_sample_large(tmp_path_factory):
    """A 600-image SYNTHETIC sample: enough for a small CNN to learn in a few epochs."""
    from data_prep.synthetic import make_sample

    root = tmp_path_factory.mktemp("sample-large") / "celeba"
    return make_sample(root, n=600, seed=1)


def prep_sample(sample, out, **settings):
    """Run the prep stage on a generated sample quietly; returns the output folder."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import run_prep

    run_prep(PrepConfig.from_dict({"data": str(sample.path), "out": str(out), **settings}), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a local moto S3 server at AWS_ENDPOINT_URL; yields its s3:// URI."""
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
