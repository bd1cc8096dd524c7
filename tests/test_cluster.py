"""The cluster path on a real two-node local Ray cluster: submit and follow jobs, manage them,
refuse node-local storage, spread trials over nodes, and survive losing a worker node.

The fixture runs `ray start --head` (dashboard and Jobs API on 127.0.0.1, token auth on) and a
second `ray start --address ...` node with its own CPU and a custom resource. The second node runs
in a private mount namespace where one folder is covered by an empty tmpfs: a path there is what
a node-local disk looks like from another machine, so the storage check has something real to
refuse. Both nodes are torn down by killing their process groups, never with `ray stop` (that
would kill every Ray on the machine, the test session's own included).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import GENDERTUNE, free_port, wait_for

from gendertune.cluster import jobs
from gendertune.cluster.shared_storage import fingerprint, nearest_existing, unreachable_nodes
from gendertune.tuning.evaluate import run_layout

RAY = str(Path(sys.executable).parent / "ray")
NODE_MEMORY = str(3 * 1024**3)
NODE_OBJECT_STORE = str(400 * 1024**2)


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:8265",
        "127.0.0.1:8265",
        "http://localhost:8265",
        "http://[::1]:8265",
        "https://ray.example.com",
    ],
)
def test_submission_addresses_accepted(address):
    assert jobs.resolve_address(address).startswith(("http://", "https://"))


def test_plain_http_to_a_remote_host_is_refused_unless_allowed(monkeypatch):
    with pytest.raises(jobs.InsecureAddressError, match="CVE-2023-48022"):
        jobs.resolve_address("http://10.1.2.3:8265")
    assert jobs.resolve_address("http://10.1.2.3:8265", allow_insecure_http=True) == "http://10.1.2.3:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.1.2.3:8265")
    with pytest.raises(jobs.InsecureAddressError):
        jobs.resolve_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="--address"):
        jobs.resolve_address(None)


def test_job_runtime_env_carries_the_project_and_its_dependencies():
    env = jobs.job_runtime_env()
    assert (Path(env["working_dir"]) / "pyproject.toml").is_file()
    assert (Path(env["working_dir"]) / "gendertune" / "cli.py").is_file()
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in env["pip"]}
    assert {"torch", "torchvision", "optuna", "pandas"} <= names
    assert "pip" not in jobs.job_runtime_env(install_dependencies=False)


def test_entrypoint_runs_the_cli_module_and_rejects_cluster_commands():
    assert (
        jobs.entrypoint_for(["gendertune", "compare", "--out", "/x y"])
        == "python -m gendertune.cli compare --out '/x y'"
    )
    for bad in ([], ["submit", "--", "demo"], ["jobs", "list"]):
        with pytest.raises(ValueError):
            jobs.entrypoint_for(bad)


def test_storage_fingerprints_tell_storage_apart(tmp_path):
    (tmp_path / "a").write_text("x")
    same = fingerprint(str(tmp_path))
    assert fingerprint(str(tmp_path)) == same != fingerprint(str(tmp_path / "a")) != fingerprint(str(tmp_path / "none"))
    assert fingerprint(str(tmp_path / "none")) == "missing"
    assert nearest_existing(tmp_path / "new" / "deeper") == tmp_path
    assert unreachable_nodes("dir:1", {"n1": "dir:1", "n2": "missing", "n3": "dir:2"}) == ["n2", "n3"]


# --- the two-node cluster ------------------------------------------------------------------


@dataclass
class TwoNodeCluster:
    address: str  # the Jobs API
    env: dict  # what a client needs: token auth settings, an isolated HOME
    shared: Path  # seen by both nodes
    local_only: Path  # covered by an empty tmpfs on the second node
    nodes: dict  # name -> Popen of its `ray start --block`
    gcs: str  # for `ray status`

    def gendertune(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*GENDERTUNE, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def job_status(self, job_id: str) -> str:
        # Through the CLI: the cluster's token settings must not leak into this test process,
        # whose own Ray session has its own token.
        return self.gendertune("jobs", "status", job_id, "--address", self.address, timeout=60).stdout

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.job_status(job_id)
            if any(f"{job_id} {end}" in line for end in ("SUCCEEDED", "FAILED", "STOPPED")):
                return line
            time.sleep(3)
        logs = self.gendertune("jobs", "logs", job_id, "--address", self.address, timeout=60).stdout
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s; its log ends:\n{logs[-4000:]}")

    def ray_status(self) -> str:
        return subprocess.run(
            [RAY, "status", "--address", self.gcs], env=self.env, capture_output=True, text=True
        ).stdout

    def cpus_in_use(self) -> float:
        used = [line.split("/")[0].strip() for line in self.ray_status().splitlines() if line.strip().endswith(" CPU")]
        return float(used[0]) if used else -1.0

    def alive_nodes(self) -> int:
        active = self.ray_status().split("Active:")[-1].split("Pending:")[0]
        return active.count("node_")


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Own session: the node's daemons share its process group, so one killpg takes the node down.
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_node(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    import psutil

    root = Path(tempfile.mkdtemp(prefix="gtc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    shared, local_only = root / "shared", root / "local-only"
    for folder in (root / "home", shared, local_only):
        folder.mkdir()
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(jobs.PROJECT_ROOT),
        # Notice the killed node in ~3 s instead of ~15 s (GCS health checks; Ray's defaults are
        # a 3 s period and 5 misses).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        # A job's `python` is whatever the node's PATH finds, as on a real cluster image: here
        # that must be this venv's, also when the tests run without activating it (make test).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # Two logical CPUs per node: a trial asking for 1.5 fits once per node (so trials must use both),
    # and after the second node dies the head still has a CPU for Ray Data beside two 0.5-CPU workers.
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        f"--memory={NODE_MEMORY}",
        f"--object-store-memory={NODE_OBJECT_STORE}",
    ]
    nodes = {}
    try:
        nodes["head"] = _start(
            [
                RAY,
                "start",
                "--head",
                *common,
                f"--port={gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={root / 'ray'}",
            ],
            env,
            root / "head.log",
        )
        info = TwoNodeCluster(
            address=f"http://127.0.0.1:{dashboard_port}",
            env=env,
            shared=shared,
            local_only=local_only,
            nodes=nodes,
            gcs=f"127.0.0.1:{gcs_port}",
        )
        wait_for(lambda: info.alive_nodes() == 1, "the head node", 120)
        second = shlex.join(
            [
                RAY,
                "start",
                *common,
                f"--address=127.0.0.1:{gcs_port}",
                '--resources={"node2": 1}',
                f"--dashboard-agent-listen-port={free_port()}",
            ]
        )
        # node2 gets its own temp dir as a second machine would: Ray hands every node the head's
        # temp-dir path, and two nodes sharing it share runtime_resources, where one node's
        # runtime-env agent deletes a job's working_dir package that the other's driver runs in.
        private = f"mount -t tmpfs gtc-local {local_only} && mount -t tmpfs gtc-ray {root / 'ray'}"
        nodes["node2"] = _start(["unshare", "-rm", "sh", "-c", f"{private} && exec {second}"], env, root / "node2.log")
        wait_for(lambda: info.alive_nodes() == 2, "the second node", 120)
        wait_for(lambda: _jobs_api_up(info), "the Jobs API", 120)
        yield info
    finally:
        for process in nodes.values():
            _kill_node(process)
        # Workers leave their node's process group; they exit once their raylet is gone, and any
        # straggler still names our temp folder on its command line.
        for process in psutil.process_iter(["cmdline"]):
            if str(root) in " ".join(process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


def _jobs_api_up(info: TwoNodeCluster) -> bool:
    return info.gendertune("jobs", "list", "--address", info.address, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def cluster_prep(cluster, synthetic_sample):
    """Prep run as a job. --no-install: the cluster runs from a virtualenv, and for a pip
    runtime_env Ray clones that whole virtualenv (torch included: minutes here; one clone under
    heavy load came out without a package), which a test can't afford. The default runtime_env's
    content is checked above; the default path itself ran green here twice before that."""
    out = cluster.shared / "prep"
    result = cluster.gendertune(
        "submit",
        "--address",
        cluster.address,
        "--follow",
        "--no-install",
        "--job-id",
        "prep-job",
        "--",
        "prep",
        "--data",
        str(synthetic_sample.path),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--split",
        "identity",
        "--ratios",
        "0.6,0.2,0.2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job prep-job SUCCEEDED" in result.stdout
    return out


def test_submitted_compare_spreads_trials_over_both_nodes(cluster, cluster_prep):
    out = cluster.shared / "compare"
    result = cluster.gendertune(
        "submit",
        "--address",
        cluster.address,
        "--follow",
        "--no-install",
        "--job-id",
        "compare-job",
        "--",
        "compare",
        "--data",
        str(cluster_prep),
        "--models",
        "resnet18",
        "--trials",
        "2",
        "--epochs",
        "1",
        "--max-concurrent",
        "2",
        # The screening trials are what spreads; a short lr test and one full-length run keep the job short.
        "--lr-test-steps",
        "20",
        "--no-retrain-challenger",
        # Train mode: each trial's worker asks for its 1.5 CPUs as its own run starts, so the two
        # trials hold a node each for a whole worker's life, start-up included. An in-process trial runs
        # in Tune's actor, and Tune hands the second trial the first one's actor when that finishes
        # before the second node's actor has started: at seconds per trial, under load, both trials
        # then ran on one node (CI, stop 28). Both modes ask for the same 1.5 CPUs per trial.
        "--trial-mode",
        "train",
        "--batch-size",
        "32",
        "--cpus-per-worker",
        "1.5",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job compare-job SUCCEEDED" in result.stdout
    board = pd.read_csv(out / "leaderboard.csv")
    error_log = out / "models" / "resnet18" / "error.log"
    assert board["status"].tolist() == ["ok"], error_log.read_text()[-3000:] if error_log.exists() else board.to_dict()
    assert run_layout.is_complete(out / "models" / "resnet18")
    trial_nodes = set()
    for result_file in (out / "searches" / "resnet18").rglob("result.json"):
        trial_nodes |= {json.loads(line)["node_id"] for line in result_file.read_text().splitlines() if line.strip()}
    assert len(trial_nodes) == 2, f"trials ran on {len(trial_nodes)} node(s)"

    assert "compare-job SUCCEEDED" in cluster.job_status("compare-job")
    logs = cluster.gendertune("jobs", "logs", "compare-job", "--address", cluster.address)
    assert "[search resnet18] trial" in logs.stdout and "resnet18" in logs.stdout
    listing = cluster.gendertune("jobs", "list", "--address", cluster.address)
    assert "prep-job\tSUCCEEDED" in listing.stdout and "compare-job\tSUCCEEDED" in listing.stdout


RECORD_NODE = """
import sys
from pathlib import Path
import ray
from gendertune.cluster.runtime import ensure_ray, run_on_other_nodes

def record(folder):
    (Path(folder) / ray.get_runtime_context().get_node_id()).touch()

ensure_ray(sys.argv[1])
run_on_other_nodes(record, sys.argv[2])
print(ray.get_runtime_context().get_node_id())
"""


def test_a_per_node_task_runs_once_on_each_node_but_the_drivers(cluster):
    """How --pretrained fills each node's weights cache: the driver's node is filled by the driver."""
    folder = cluster.shared / "per-node"
    folder.mkdir()
    driver = subprocess.run(
        [sys.executable, "-c", RECORD_NODE, cluster.gcs, str(folder)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    recorded = [p.name for p in folder.iterdir()]
    assert len(recorded) == 1 and recorded[0] != driver.stdout.strip(), (recorded, driver.stdout)


def test_node_local_output_is_refused_before_any_work(cluster, cluster_prep):
    out = cluster.local_only / "run"
    result = cluster.gendertune(
        "submit",
        "--address",
        cluster.address,
        "--follow",
        "--no-install",
        "--",
        "train",
        "--data",
        str(cluster_prep),
        "--model",
        "resnet18",
        "--out",
        str(out),
    )
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "is local to this node" in result.stdout
    assert not out.exists() and not list(cluster.local_only.iterdir())


def test_losing_a_worker_node_resumes_training_from_a_checkpoint(cluster, cluster_prep):
    out = cluster.shared / "run-kill"
    # SPREAD is a preference: while an earlier job still releases its CPUs, both workers could
    # land on the head and the node kill would hit no worker. Start from an idle cluster.
    wait_for(lambda: cluster.cpus_in_use() == 0, "the cluster's CPUs to be free", 120)
    submitted = cluster.gendertune(
        "submit",
        "--address",
        cluster.address,
        "--no-install",
        "--job-id",
        "kill-job",
        "--",
        "train",
        "--data",
        str(cluster_prep),
        "--model",
        "resnet18",
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--placement-strategy",
        "SPREAD",
        "--max-failures",
        "2",
    )
    assert submitted.returncode == 0, submitted.stderr
    # Train writes this snapshot once a checkpoint is registered: killing before that could lose it.
    snapshot = out / run_layout.RAY_RUN_NAME / "checkpoint_manager_snapshot.json"
    # Polled often, and 3 epochs: the kill must land while training still runs.
    wait_for(snapshot.exists, "the first registered checkpoint", 300, interval=0.1)
    _kill_node(cluster.nodes["node2"])
    final = cluster.wait_for_job("kill-job", timeout=600)
    assert "kill-job SUCCEEDED" in final, cluster.gendertune(
        "jobs", "logs", "kill-job", "--address", cluster.address
    ).stdout[-3000:]
    history = pd.read_csv(out / run_layout.HISTORY)
    assert history["epoch"].tolist() == [1, 2, 3]
    # Epochs after the failure ran in an attempt that started from a checkpoint, not from epoch 0.
    assert history["attempt_start_epoch"].max() >= 1
    assert cluster.alive_nodes() == 1


def test_jobs_stop_stops_a_running_job(cluster, cluster_prep):
    submitted = cluster.gendertune(
        "submit",
        "--address",
        cluster.address,
        "--no-install",
        "--job-id",
        "long-job",
        "--",
        "train",
        "--data",
        str(cluster_prep),
        "--model",
        "resnet18",
        "--epochs",
        "50",
        "--out",
        str(cluster.shared / "long-run"),
    )
    assert submitted.returncode == 0 and "long-job" in submitted.stdout
    wait_for(lambda: "RUNNING" in cluster.job_status("long-job"), "the job to run", 120)
    stopped = cluster.gendertune("jobs", "stop", "long-job", "--address", cluster.address)
    assert stopped.returncode == 0 and "long-job STOPPED" in stopped.stdout
