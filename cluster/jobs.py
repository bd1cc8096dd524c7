"""Run gendertune commands as Ray jobs: submit, follow, status, logs, stop, list.

A job is any `gendertune` command line, run on the cluster's head node as
`python -m gendertune.cli ...` inside a runtime environment that carries this project's source
(`working_dir`) and its dependencies (`pip`, resolved against what the cluster already has).
Inside the job the command attaches to the running cluster (Ray sets RAY_ADDRESS for it), so
every command behaves the same locally and on a cluster.

The Jobs API is plain HTTP and unauthenticated unless the cluster uses Ray's token
authentication (CVE-2023-48022 is what happens otherwise): we only talk plain HTTP to a loopback
address (an SSH or kubectl port-forward ends there) unless the user explicitly opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from gendertune.base.errors import GendertuneError, MissingInputError, UnreachableError, UserInputError

ADDRESS_ENV = "RAY_ADDRESS"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never uploaded with the job: environments, VCS data, caches and local outputs (Ray also
# honours the project's .gitignore).
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "demo-out",
    "*.parquet",
    "*.jpg",
]


class InsecureAddressError(UserInputError):
    """A plain-HTTP Jobs API address that is not loopback, without the explicit opt-in."""


def resolve_address(address: str | None, *, allow_insecure_http: bool = False) -> str:
    """The Jobs API URL from --address or RAY_ADDRESS, refusing plain HTTP to a remote host."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise UserInputError(
            "no cluster address: pass --address http://127.0.0.1:8265 (the dashboard, e.g. through "
            f"`ray dashboard CLUSTER.yaml` or a port-forward) or set {ADDRESS_ENV}"
        )
    if "://" not in address:
        address = f"http://{address}"  # what Ray's client assumes too
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https"):
        raise UserInputError(f"--address {address}: expected the dashboard's http(s)://HOST:PORT (default port 8265)")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname or ""):
        raise InsecureAddressError(
            f"refusing to submit over plain HTTP to {parts.hostname}: Ray's Jobs API would run anyone's code "
            "(CVE-2023-48022). Port-forward the dashboard to 127.0.0.1 (`ray dashboard CLUSTER.yaml`, "
            "`kubectl port-forward`), use https, or pass --allow-insecure-http if the network is trusted "
            "and the cluster uses RAY_AUTH_MODE=token"
        )
    return address


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def project_dependencies(project_root: Path = PROJECT_ROOT) -> list[str]:
    """The `[project].dependencies` of this project's pyproject.toml."""
    with open(project_root / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def job_runtime_env(*, install_dependencies: bool = True, project_root: Path = PROJECT_ROOT) -> dict:
    """The runtime_env a job needs: this project's source and, unless the cluster image already
    has them, its dependencies (pip builds on the cluster's own packages, so present ones are kept)."""
    if not (project_root / "pyproject.toml").is_file():
        raise MissingInputError(
            f"submit uploads the project source, but {project_root} has no pyproject.toml: "
            "run it from a source checkout installed with `pip install -e .`"
        )
    env: dict = {"working_dir": str(project_root), "excludes": WORKING_DIR_EXCLUDES}
    if install_dependencies:
        env["pip"] = project_dependencies(project_root)
    return env


def entrypoint_for(command: list[str]) -> str:
    """`python -m gendertune.cli ARGS`: the module form works whether or not the cluster installed us."""
    if not command:
        raise UserInputError(
            "nothing to submit: give a gendertune command after --, e.g. `submit -- compare --data ...`"
        )
    if command[0] == "gendertune":
        command = command[1:]
    if command and command[0] in ("submit", "jobs"):
        raise UserInputError(f"`{command[0]}` talks to a cluster; it can't itself run as a job")
    return shlex.join(["python", "-m", "gendertune.cli", *command])


def client(address: str):
    """A Jobs API client that authenticates as Ray's own CLI does (`ray start`, `ray job`): with
    RAY_AUTH_MODE unset, a token in RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token turns token auth on.
    Any local run writes that file, and a later `ray start --head` then requires it."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.job_submission import JobSubmissionClient

    from gendertune.cluster.runtime import quiet_token_setup

    # Quietly: its "token authentication is enabled" warning is no news to the user of a cluster
    # that requires one, and would precede every command's output or one-line error.
    with quiet_token_setup():
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    with _one_line_errors(address):
        return JobSubmissionClient(address)


@contextlib.contextmanager
def _one_line_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """The Jobs API's failures as the project's one-line errors: nothing listening, not a Ray
    dashboard, a token missing or refused, an unknown job."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except GendertuneError:  # already one line (an inner call's)
        raise
    except AuthenticationError as err:
        raise UserInputError(
            f"{address} requires Ray's token authentication and this token is missing or wrong ({str(err).splitlines()[0]}): "
            "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH; default ~/.ray/auth_token) to the cluster's token"
        ) from None
    except requests.HTTPError as err:  # an HTTP server, but not Ray's dashboard
        raise UnreachableError(f"{address} is not a Ray dashboard ({err}); check --address") from None
    except (ConnectionError, requests.ConnectionError) as err:
        raise UnreachableError(
            f"no Ray cluster answers at {address} ({err}); check --address and that the dashboard "
            "is reachable (port 8265, a port-forward)"
        ) from None
    except RuntimeError as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if job_id is not None and "does not exist" in str(err):
            raise UserInputError(f"no job {job_id} on {address}; `gendertune jobs list` shows them") from None
        if "Jobs API is not supported" in str(err) or "Version check" in str(err):
            raise UnreachableError(f"{address} is not a Ray dashboard ({text}); check --address") from None
        raise


def submit(command: list[str], *, address: str, install_dependencies: bool = True, job_id: str | None = None) -> str:
    """Submit `command` as a job; returns its id. The entrypoint takes no CPU: the work it
    starts (Ray Data, Train workers, Tune trials) requests its own resources."""
    entrypoint, runtime_env = entrypoint_for(command), job_runtime_env(install_dependencies=install_dependencies)
    with _one_line_errors(address):
        return client(address).submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, entrypoint_num_cpus=0, submission_id=job_id
        )


def follow(address: str, job_id: str, *, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status name."""
    jobs = client(address)

    async def stream() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    with _one_line_errors(address, job_id):
        asyncio.run(stream())
    return wait(address, job_id, timeout_s=60)


def wait(address: str, job_id: str, *, timeout_s: float) -> str:
    """Poll until the job reaches a terminal status (the log stream can end slightly before)."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        with _one_line_errors(address, job_id):
            status = jobs.get_job_status(job_id)
        if status.is_terminal() or time.monotonic() > deadline:
            return str(status.value)
        time.sleep(0.5)


def status_line(address: str, job_id: str) -> str:
    with _one_line_errors(address, job_id):
        info = client(address).get_job_info(job_id)
    message = f": {info.message}" if info.message else ""
    return f"{job_id} {info.status.value}{message}"


def logs(address: str, job_id: str) -> str:
    with _one_line_errors(address, job_id):
        return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> str:
    """Ask the job to stop and wait for it to end; returns its final status."""
    with _one_line_errors(address, job_id):
        client(address).stop_job(job_id)
    return wait(address, job_id, timeout_s=60)


def list_lines(address: str) -> list[str]:
    with _one_line_errors(address):
        jobs = client(address).list_jobs()
    rows = sorted(jobs, key=lambda job: job.start_time or 0)
    return [f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}" for job in rows]
