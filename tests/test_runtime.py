"""The local Ray that every command starts (gendertune.cluster.runtime): what it exposes to the network.

Listening sockets are read from /proc (Linux, like CI): each LISTEN socket's inode is matched to
the process holding it, and only this test process and its descendants count (Ray's GCS, raylet,
agents and workers are all started from the driver), so other software on the machine doesn't.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import prep_sample

from gendertune.cli import main
from gendertune.cluster.runtime import local_system_config

# Non-loopback listeners a local run may leave; 12 before it was bound to 127.0.0.1. A new one
# (a Ray upgrade, an agent we start) must be looked at, not absorbed.
ALLOWED_NON_LOOPBACK = 0
_LISTEN = "0A"


def _listening_sockets() -> dict[str, str]:
    """{socket inode: local address} of every listening TCP socket on the machine."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN:
                sockets[inode] = _address(local.split(":")[0])
    return sockets


def _address(hex_ip: str) -> str:
    """/proc/net's little-endian hex words as an IP address."""
    raw = bytes.fromhex(hex_ip)
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(ordered)
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # exited meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listeners_of(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, address) of each listening socket those processes hold."""
    sockets = _listening_sockets()
    held = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        held += [(pid, sockets[link[8:-1]]) for link in links if link.startswith("socket:[") and link[8:-1] in sockets]
    return held


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's /proc")
def test_a_local_run_listens_only_on_loopback(ray_session):
    ray = ray_session
    # Workers open their own listeners: make sure some exist before counting.
    assert ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(2)])
    listeners = _listeners_of(_descendants(os.getpid()))
    assert len(listeners) >= 4, listeners  # GCS, raylet, the driver and a worker at least: the count is real
    exposed = [(pid, address) for pid, address in listeners if not ipaddress.ip_address(address).is_loopback]
    assert len(exposed) <= ALLOWED_NON_LOOPBACK, exposed
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_a_local_ray_keeps_its_idle_workers(ray_session, tmp_path):
    # Ray 2.60's workers that exit for idleness sometimes crash on the console (local_system_config).
    ray = ray_session

    def wait_for_peers(folder: str, count: int) -> int:
        """Hold this worker until `count` tasks hold theirs, so that each has its own process."""
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getpid()

    soft_limit = int(ray.cluster_resources()["CPU"])  # the raylet's: ends idle workers beyond it
    count = soft_limit + 4
    pids = ray.get([ray.remote(num_cpus=0.5)(wait_for_peers).remote(str(tmp_path), count) for _ in range(count)])
    assert len(set(pids)) == count
    time.sleep(3)  # Ray's idle threshold is 1 s, checked every 0.2 s
    assert [pid for pid in pids if not Path(f"/proc/{pid}").exists()] == []


def test_a_users_own_raylet_setting_wins(monkeypatch):
    monkeypatch.setenv("RAY_kill_idle_workers_interval_ms", "200")
    assert "kill_idle_workers_interval_ms" not in local_system_config(8)
    monkeypatch.delenv("RAY_kill_idle_workers_interval_ms")
    assert local_system_config(8)["kill_idle_workers_interval_ms"] == 0


@pytest.fixture(scope="module")
def small_prep(ray_session, synthetic_sample, tmp_path_factory):
    return prep_sample(
        synthetic_sample,
        tmp_path_factory.mktemp("listeners") / "prep",
        image_size=32,
        split="identity",
        ratios=[0.6, 0.2, 0.2],
        align="none",
    )


RUNNING = {  # two DDP workers: the rank-0 worker opens torch's rendezvous store
    "train": ["train", "--model", "resnet18", "--epochs", "1", "--workers", "2", "--batch-size", "16"],
    "compare": [
        "compare",
        "--models",
        "resnet18",
        "--trials",
        "1",
        "--epochs",
        "1",
        "--workers",
        "2",
        "--trial-mode",
        "train",
        "--batch-size",
        "16",
        "--lr-test-steps",
        "20",
    ],
}


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's /proc")
@pytest.mark.parametrize("command", RUNNING)
def test_a_running_ddp_stage_listens_only_on_loopback(command, small_prep, tmp_path):
    args = [*RUNNING[command], "--data", str(small_prep), "--out", str(tmp_path / "out")]
    result = {}
    stage = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    stage.start()
    seen: set[tuple[int, str, bytes]] = set()  # (pid, address, the process's name while it ran)
    while stage.is_alive():  # the store lives only while the workers do: sample throughout
        seen.update(
            (pid, address, _cmdline(pid).split(b"\0")[0]) for pid, address in _listeners_of(_descendants(os.getpid()))
        )
        time.sleep(0.2)
    stage.join()
    assert result["code"] == 0
    assert any(b"RayTrainWorker" in name for _, _, name in seen), "no Train worker was seen listening"
    exposed = [(pid, address, name) for pid, address, name in seen if not ipaddress.ip_address(address).is_loopback]
    assert len(exposed) <= ALLOWED_NON_LOOPBACK, exposed


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_resource_share_answers_in_its_own_thread_only(monkeypatch):
    from gendertune.cluster.runtime import LOCAL_CORES_ENV, Share, compute_parallelism, gpu_parallelism, resource_share

    monkeypatch.setenv(LOCAL_CORES_ENV, "3")  # a local machine's cores, read without asking Ray
    whole = compute_parallelism()
    assert whole == 3
    seen = {}

    def other_thread():
        seen["other"] = compute_parallelism()

    with resource_share(Share(cpus=whole + 5, gpus=3)):
        assert (compute_parallelism(), gpu_parallelism()) == (whole + 5, 3)
        assert compute_parallelism(7) == 7  # an explicit request still wins
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen["other"] == whole  # a thread started inside the block plans with the whole machine
    assert compute_parallelism() == whole  # and the block's end restores it here


def test_a_local_start_keeps_token_auth_on_without_announcing_it(tmp_path):
    """Ray turns token authentication on for a new local Ray and says so at WARNING on every start,
    with "set RAY_AUTH_MODE=disabled to opt out": nothing a user should act on, so not on the console."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)  # Ray writes its token file under ~/.ray: here, not in the user's home
    code = (
        "import os, ray\n"
        "from gendertune.cluster.runtime import ensure_ray\n"
        "ensure_ray()\n"
        "print(os.environ.get('RAY_AUTH_MODE'))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["token"]  # still on
    assert "Token authentication" not in done.stderr, done.stderr
    assert (tmp_path / ".ray" / "auth_token").is_file()
