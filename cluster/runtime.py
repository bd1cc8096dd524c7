"""Start or attach to Ray, the same way for every command.

With `--address`/`RAY_ADDRESS` (or inside a Ray job, which sets it) we attach to the cluster.
Otherwise a local Ray starts, bound to the loopback address, with more *logical* CPUs than the machine has cores: on a 2-core box
Ray Data reads, Train workers and Tune trial drivers each hold CPU slots, and with only 2 slots
they wait on each other forever (see the Ray 2.60 notes). Compute-heavy stages cap their own
concurrency at the physical core count instead (`compute_parallelism`), or at the share of the
cluster a caller set for its thread (`resource_share`: a comparison's models searched side by side).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gendertune.base.errors import GendertuneError, UserInputError

LOCAL_LOGICAL_CPUS_MIN = 8
# Ray loggers whose warnings report our own deliberate settings, not problems, once per process or
# every second. Raised to ERROR in the driver and (local Ray) in every worker, so real warnings show.
QUIET_LOGGERS = (
    # The stages turn Ray Data's progress bars off (they would interleave with the stages' lines);
    # each process then warns that they are off.
    "ray.data._internal.progress",
    # A local Ray runs without the dashboard, whose State API Train V2's placement-group monitor
    # polls every second to see whether the controller died; it warns on each failed poll. A local
    # session's placement groups end with the session; a cluster has its dashboard.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)
# Ray's token set-up, which announces at WARNING that a new local Ray turned token authentication on
# ("set RAY_AUTH_MODE=disabled to opt out"), and the same for a token found on the way to a cluster.
# Both are what we want (a local Ray that asks for its token; a cluster's token used as Ray's CLI
# does), not something for the user to act on: quieted while we start or attach (quiet_token_setup).
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
# Set before a local Ray starts, so its worker processes (which inherit the environment) know
# the real core count too: inside a Tune trial or a Train worker a module flag would be unset.
LOCAL_CORES_ENV = "GENDERTUNE_LOCAL_CORES"


def ensure_ray(address: str | None = None) -> None:
    """Initialise Ray once per process: attach to `address`/RAY_ADDRESS, else start locally."""
    if ray.is_initialized():
        return
    quiet_ray_internals()
    # Ray Data's INFO lines (each dataset's plan, start and finish) bury the stages' own progress.
    # Its worker processes read this variable when they start; this process configured its
    # logging when it imported ray.data, so its logger is set directly. A user's value wins.
    if "RAY_DATA_LOG_LEVEL" not in os.environ:
        os.environ["RAY_DATA_LOG_LEVEL"] = "WARNING"
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        with quiet_token_setup():
            ray.init(address=address, logging_level=logging.WARNING)
        return
    os.environ[LOCAL_CORES_ENV] = str(os.cpu_count() or 1)
    # No preemption watcher (a user's own value wins): it watches for cloud nodes being reclaimed,
    # which a local machine has not, and its restartable actor logs a core_worker error at every
    # training run's start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # A local Ray needs no other machine to reach it, yet by default its GCS, raylet, object
    # manager and every worker listen on all interfaces. Ray binds all of them to 127.0.0.1 when
    # the node's address is the loopback one, which it chooses itself only where it treats the OS
    # as single-machine (this constant, off on Linux; an explicit 127.0.0.1 is replaced by the
    # public address). Set just for this start: an attach later in the process must see it as Ray
    # does, or the driver would report a loopback address to a real cluster.
    cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    logical_cpus = max(LOCAL_LOGICAL_CPUS_MIN, os.cpu_count() or 1)
    try:
        with quiet_token_setup():
            ray.init(
                num_cpus=logical_cpus,
                include_dashboard=False,
                _system_config=local_system_config(logical_cpus),
                logging_level=logging.WARNING,
                # Only for a Ray we start: on a cluster the job's own runtime_env (a submission's
                # working_dir, pip) must not be replaced by ours.
                runtime_env={"worker_process_setup_hook": f"{__name__}.local_worker_setup"},
            )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def local_system_config(logical_cpus: int) -> dict:
    """The raylet settings of a Ray we start (an attach changes nothing); a user's own
    RAY_<setting> environment variable wins over each."""
    settings = {
        # Ray starts at most min(cores, logical CPUs) worker processes at a time, and its raylet
        # warns on the console ("N PYTHON worker processes ... 4x the maximum expected startup
        # concurrency") once four times that many are alive. With more logical CPUs than cores
        # (ensure_ray), that is an ordinary run's worker count on a small machine: the limit
        # follows the logical CPUs instead, as on a machine with that many cores.
        "worker_maximum_startup_concurrency": logical_cpus,
        # The raylet ends workers that sit idle beyond its soft limit (the logical CPUs), and in
        # Ray 2.60 a worker exiting that way sometimes touches its already freed core worker:
        # absl prints "Mutex corrupt" or "RAW: Lock blocking" and the process aborts, lines the
        # driver forwards to the console (docs/cluster.md). A local session's pool is bounded by
        # its logical CPUs and its actors, a kept worker need not start (and import torch) again,
        # and all of them end with the session.
        "kill_idle_workers_interval_ms": 0,
        # Nor does it start one idle worker per logical CPU as the first driver connects: on a
        # small machine that is 8 processes importing Ray at once beside the command's own start,
        # and kept, each idle one costs about 1% of a core (docs/cluster.md). Workers start as
        # tasks and actors need them.
        "prestart_worker_first_driver": False,
    }
    return {name: value for name, value in settings.items() if f"RAY_{name}" not in os.environ}


@contextlib.contextmanager
def quiet_token_setup() -> Iterator[None]:
    """Within the block, Ray's token set-up logs errors only (TOKEN_SETUP_LOGGER)."""
    setup_logger = logging.getLogger(TOKEN_SETUP_LOGGER)
    level = setup_logger.level
    setup_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        setup_logger.setLevel(level)


def local_worker_setup() -> None:
    """What each worker process of a Ray we start does first (its worker_process_setup_hook)."""
    quiet_ray_internals()
    # Ray's State API, which Train's placement-group monitor polls, looks for "the" local Ray when
    # RAY_ADDRESS is unset, and with a second one on the machine (another gendertune command, a
    # notebook's Ray) it finds two and the monitor's thread dies with a traceback on the console.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_ray_internals() -> None:
    """Raise QUIET_LOGGERS to ERROR in this process."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of the cluster one piece of work may plan with: CPU cores (threads) and GPUs."""

    cpus: int
    gpus: int


# Set per thread (a ContextVar, so each side-by-side search sees its own); None = the whole cluster.
_SHARE: contextvars.ContextVar[Share | None] = contextvars.ContextVar("gendertune_share", default=None)


@contextlib.contextmanager
def resource_share(share: Share) -> Iterator[None]:
    """Within the block, in this thread, compute_parallelism and gpu_parallelism answer `share`."""
    token = _SHARE.set(share)
    try:
        yield
    finally:
        _SHARE.reset(token)


def compute_parallelism(requested: int = 0) -> int:
    """How many CPU-bound tasks to run at once: `requested`, else this thread's resource_share,
    else real cores locally or cluster CPUs."""
    if requested > 0:
        return requested
    if (share := _SHARE.get()) is not None:
        return share.cpus
    if os.environ.get(LOCAL_CORES_ENV):
        return int(os.environ[LOCAL_CORES_ENV])
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gpu_parallelism() -> int:
    """GPUs to plan with: this thread's resource_share, else the cluster's."""
    if (share := _SHARE.get()) is not None:
        return share.gpus
    return int(ray.cluster_resources().get("GPU", 0))


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
        problems.append(
            f"{workers} workers x {cpus_per_worker:g} CPUs need {workers * cpus_per_worker:g} CPUs "
            f"plus 1 for data loading; the cluster has {total_cpus:g}"
        )
    if cpus_per_worker > widest:
        problems.append(f"--cpus-per-worker {cpus_per_worker:g} is more than any one node has ({widest:g})")
    if workers * gpus_per_worker > total_gpus:
        problems.append(
            f"{workers} workers x {gpus_per_worker} GPU need {workers * gpus_per_worker}; the cluster has {total_gpus:g}"
        )
    if problems:
        raise UserInputError("; ".join(problems) + ": use fewer --workers or --cpus-per-worker, or a larger cluster")


def run_on_other_nodes(function: Callable[..., Any], *args: Any) -> None:
    """`function(*args)` once on every alive node but the driver's, at the same time, each in a
    task pinned to its node (e.g. to fill a per-node cache the driver filled for its own node,
    before workers that read it start there). It takes no CPU, so it never waits behind them. An
    error comes back as the function raised it, with the node named."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    task = ray.remote(function)
    pending = {
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            *args
        ): node
        for node in nodes
    }
    for ref, node in pending.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, GendertuneError):
                raise type(err.cause)(f"on node {node}: {err.cause}") from err.cause
            raise


def is_local() -> bool:
    """Whether this process's Ray is the loopback-only one ensure_ray starts."""
    return ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
