"""Refuse, before any work starts, a path that not every node of the cluster can reach.

On one node every local path works. On several, Ray Data readers, Train workers and Tune trials
run on any node and read the prepared data and write checkpoints there, so each path a stage uses
must be on storage every node mounts (NFS, EFS, Filestore, a ReadWriteMany volume...) or an
object-store URI (gendertune.cluster.storage; not probed: every node reaches it the same way). A path
that only the driver's node has would fail late and confusingly (missing checkpoints on resume,
empty reads), so we check up front, the way Ray Train validates its own storage: the driver
leaves a unique marker where the stage will write (or fingerprints what it will read) and one
task pinned to every alive node must find the same thing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gendertune.base.errors import UserInputError
from gendertune.cluster.storage import is_uri

PROBE_PREFIX = ".gendertune-storage-probe-"


class StorageNotSharedError(UserInputError):
    """A local path on a multi-node cluster that some node cannot see."""


def fingerprint(path: str) -> str:
    """What a node sees at `path`: the file's size and first bytes, or a directory's sorted entry
    names; "missing" when there is nothing. Equal fingerprints on every node = the same storage."""
    target = Path(path)
    if target.is_file():
        with open(target, "rb") as handle:
            head = handle.read(1 << 16)
        return f"file:{target.stat().st_size}:{hashlib.sha256(head).hexdigest()}"
    if target.is_dir():
        names = sorted(os.listdir(target))[:2000]
        return "dir:" + hashlib.sha256("\n".join(names).encode()).hexdigest()
    return "missing"


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unreachable_nodes(expected: str, seen_by_node: dict[str, str]) -> list[str]:
    """Node ids whose fingerprint differs from the driver's."""
    return sorted(node for node, seen in seen_by_node.items() if seen != expected)


def _alive_nodes() -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]


def _fingerprint_on_every_node(path: str, nodes: list[str]) -> dict[str, str]:
    probe = ray.remote(fingerprint)
    refs = {
        node: probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            path
        )
        for node in nodes
    }
    return {node: ray.get(ref) for node, ref in refs.items()}


def _check(path: str, described: str, nodes: list[str]) -> None:
    expected = fingerprint(path)
    missing = unreachable_nodes(expected, _fingerprint_on_every_node(path, nodes))
    if missing:
        raise StorageNotSharedError(
            f"{described} is local to this node, but this Ray cluster has {len(nodes)} nodes and "
            f"{len(missing)} of them ({', '.join(n[:12] for n in missing)}) see something else there. "
            "Use a path on storage every node mounts (NFS, EFS, a ReadWriteMany volume); nothing was started"
        )


def require_shared(*, reads: Iterable[str] = (), writes: Iterable[str] = ()) -> None:
    """On a multi-node cluster, check every local path in `reads` (must look the same from every
    node) and `writes` (a marker written here must be visible from every node). Call after Ray is
    up and before any work."""
    nodes = _alive_nodes()
    if len(nodes) < 2:
        return
    # An object-store URI is reached over the network from every node alike.
    reads = [path for path in reads if path and not is_uri(path)]
    writes = [path for path in writes if path and not is_uri(path)]
    for path in reads:
        _check(str(Path(path).absolute()), f"input {path}", nodes)
    for path in writes:
        # The output may not exist yet; its nearest existing parent is where it will be created.
        folder = nearest_existing(Path(path).absolute())
        marker = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            marker.write_text(marker.name)
        except OSError as err:
            raise StorageNotSharedError(f"output {path}: cannot write in {folder} ({err})") from None
        try:
            _check(str(marker), f"output {path} (in {folder})", nodes)
        finally:
            marker.unlink(missing_ok=True)
