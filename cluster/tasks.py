"""A bounded runner of Ray tasks (at most N at a time, results in call order) and its progress lines.

Prep hashes and decodes with it; a task's worker process keeps what it loaded between tasks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import ray

logger = logging.getLogger(__name__)


def run_tasks(
    fn: Callable, calls: Sequence[tuple], *, parallelism: int, on_done: Callable[[int], None] | None = None, **shared
) -> list:
    """`fn(*call, **shared)` for every call as Ray tasks, at most `parallelism` at a time; results
    in call order; `on_done(index)` after each call finishes. The bound matters: a local Ray
    declares more CPUs than the machine has cores (gendertune.cluster.runtime), and more decoders than cores
    only thrash the caches."""
    task = ray.remote(fn)
    results: list = [None] * len(calls)
    running: dict = {}
    try:
        for index, call in enumerate(calls):
            if len(running) >= parallelism:
                _finish_one(running, results, on_done)
            running[task.remote(*call, **shared)] = index
        while running:
            _finish_one(running, results, on_done)
    finally:
        _cancel_and_wait(list(running))  # only after an error (or Ctrl-C)
    return results


def _cancel_and_wait(refs: list) -> None:
    """Cancel the tasks still running and wait until each has ended: the caller removes the folder
    they write into next, and a task still running would re-create it, with no owner to clean it."""
    for ref in refs:
        ray.cancel(ref)
    for ref in refs:
        try:
            ray.get(ref)
        except Exception:  # cancelled, or failed on its own: either way it has stopped writing
            pass


def _finish_one(running: dict, results: list, on_done: Callable[[int], None] | None) -> None:
    (done,), _ = ray.wait(list(running), num_returns=1)
    index = running.pop(done)
    results[index] = ray.get(done)
    if on_done is not None:
        on_done(index)


class Progress:
    """`on_done` for run_tasks: logs images done / total and the rate, at most every
    `every_s` seconds and once at the end."""

    def __init__(self, label: str, sizes: Sequence[int], *, every_s: float = 10.0):
        self.label, self.sizes, self.every_s = label, sizes, every_s
        self.total, self.done = sum(sizes), 0
        self.started = self.printed = time.perf_counter()

    def __call__(self, index: int) -> None:
        self.done += self.sizes[index]
        now = time.perf_counter()
        if now - self.printed >= self.every_s or self.done == self.total:
            self.printed = now
            rate = self.done / max(now - self.started, 1e-9)
            logger.info(
                f"{self.label}: {self.done}/{self.total} images ({self.done / self.total:.0%}), {rate:.0f} img/s"
            )
