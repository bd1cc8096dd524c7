"""gendertune.cluster.jobs against a real single-node Ray head: the path users take most (a local
run first, which writes Ray's token file; then `ray start --head`, which turns token auth on
because of that file; then `gendertune jobs`/`submit` with RAY_AUTH_MODE unset)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import GENDERTUNE, free_port, wait_for

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def _gendertune(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GENDERTUNE, *args], env=env, capture_output=True, text=True, timeout=120)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (401 included: the dashboard is up, asking for a token)."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def token_head():
    """A head started the way a user does, with RAY_AUTH_MODE unset and ~/.ray/auth_token present."""
    root = Path(tempfile.mkdtemp(prefix="gtj-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what any local run leaves
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    dashboard_port = free_port()
    head = subprocess.Popen(
        [
            *RAY_CLI,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={root / 'ray'}",
        ],
        env=env,
        stdout=open(root / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for(lambda: _answers(f"{address}/api/version"), "the Jobs API", 120)
        yield address, env, root
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_jobs_authenticate_with_the_token_file_as_rays_cli_does(token_head):
    address, env, _ = token_head
    result = _gendertune(env, "jobs", "list", "--address", address)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_without_the_token_jobs_say_in_one_line_what_to_set(token_head):
    address, env, root = token_head
    elsewhere = root / "other-home"
    elsewhere.mkdir(exist_ok=True)
    result = _gendertune({**env, "HOME": str(elsewhere)}, "jobs", "list", "--address", address)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "set RAY_AUTH_TOKEN" in error[0], result.stderr[-3000:]


@pytest.mark.integration
def test_an_unknown_job_id_is_a_one_line_error(token_head):
    address, env, _ = token_head
    result = _gendertune(env, "jobs", "status", "no-such-job", "--address", address)
    assert result.returncode == 2 and "no job no-such-job on" in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
