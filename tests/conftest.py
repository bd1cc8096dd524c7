"""Shared fixtures: an isolated HOME, one Ray session for the whole run, a generated sample.

HOME is pointed at a temporary folder before Ray is imported anywhere, so Ray's token file
(~/.ray/auth_token) and torch's hub cache are the tests' own and never a user's.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="gendertune-test-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")

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
