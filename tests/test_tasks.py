"""gendertune.cluster.tasks: the bounded Ray-task runner, on the session's real Ray."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gendertune.cluster.tasks import run_tasks


def test_after_a_failed_task_no_other_task_writes_into_the_removed_folder(ray_session, tmp_path):
    def write_later(index: int, folder: str) -> int:  # nested: Ray pickles it by value, not by module
        if index == 0:
            raise OSError("No space left on device")  # the first task fails at once, the others still run
        try:
            time.sleep(1.5)
        except KeyboardInterrupt:  # ray.cancel's interrupt: a task inside native code (a Parquet write) sees it late
            time.sleep(1.5)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{index}.txt").write_text("late")
        return index

    staging = tmp_path / "staging"
    with pytest.raises(Exception, match="No space left"):
        try:
            run_tasks(write_later, [(i, str(staging)) for i in range(3)], parallelism=3)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # what a failed stage does with its staging folder
    time.sleep(4)  # longer than any task would still need to write
    assert not staging.exists()
