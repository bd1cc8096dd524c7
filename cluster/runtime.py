"""Start or attach to Ray, the same way for every command.

With `--address`/`RAY_ADDRESS` (or inside a Ray job, which sets it) we attach to the cluster.
Otherwise a local Ray starts with more *logical* CPUs than the machine has cores: on a 2-core box
Ray Data reads, Train workers and Tune trial drivers each hold CPU slots, and with only 2 slots
they wait on each other forever (see the Ray 2.60 notes). Compute-heavy stages cap their own
concurrency at the physical core count instead (`compute_parallelism`).
"""

from __future__ import annotations

import logging
import os

import ray

from cluster.errors import UserInputError

LOCAL_LOGICAL_CPUS_MIN = 8
# Set before a local Ray starts, so its worker processes (which inherit the environment) know
# the real core count too: inside a Tune trial or a Train worker a module flag would be unset.
LOCAL_CORES_ENV = "GENDERTUNE_LOCAL_CORES"


def ensure_ray(address: str | None = None) -> None:
    """Initialise Ray once per process: attach to `address`/RAY_ADDRESS, else start locally."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    os.environ[LOCAL_CORES_ENV] = str(os.cpu_count() or 1)
    ray.init(
        num_cpus=max(LOCAL_LOGICAL_CPUS_MIN, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level=logging.WARNING,
    )


def compute_parallelism(requested: int = 0) -> int:
    """How many CPU-bound tasks to run at once: `requested`, else real cores locally or cluster CPUs."""
    if requested > 0:
        return requested
    if os.environ.get(LOCAL_CORES_ENV):
        return int(os.environ[LOCAL_CORES_ENV])
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def require_resources(*, workers: int, cpus_per_worker: float, gpus_per_worker: int) -> None:
    """Fail in seconds, saying what there is, when the cluster cannot place `workers` workers at
    once, instead of Ray waiting forever for resources that will never come. One CPU stays free
    for the Ray Data tasks that feed the workers (without it they wait on each other)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    widest = max((n.get("CPU", 0) for n in nodes), default=0)
    problems = []
    if workers * cpus_per_worker > total_cpus - 1:
        problems.append(f"{workers} workers x {cpus_per_worker:g} CPUs need {workers * cpus_per_worker:g} CPUs "
                        f"plus 1 for data loading; the cluster has {total_cpus:g}")
    if cpus_per_worker > widest:
        problems.append(f"--cpus-per-worker {cpus_per_worker:g} is more than any one node has ({widest:g})")
    if workers * gpus_per_worker > total_gpus:
        problems.append(f"{workers} workers x {gpus_per_worker} GPU need {workers * gpus_per_worker}; the cluster has {total_gpus:g}")
    if problems:
        raise UserInputError("; ".join(problems) + ": use fewer --workers or --cpus-per-worker, or a larger cluster")
