"""Fault injection: `prep` and `train` killed at random points (SIGKILL: no cleanup runs; SIGINT:
Ctrl-C) several times each. Whatever the moment, nothing half-written may look complete, Ctrl-C
exits 130 with the resume hint, and re-running the same command completes.

Each command runs as its own process with its own local Ray, as a user's would. The kill times
are random; the seed is in every failure message (GENDERTUNE_FAULT_SEED replays one)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import GENDERTUNE

from gendertune.data_prep.layout import open_prepared
from gendertune.tuning.evaluate import run_layout

SEED = int(os.environ.get("GENDERTUNE_FAULT_SEED", time.time_ns() % 2**32))
# (signal, seconds after start): early points land in Ray's start-up, late ones in the work itself.
# Twice each signal per command; a train that finishes between kills ends the series early.
KILLS = {
    "prep": [(signal.SIGKILL, (2, 14)), (signal.SIGINT, (4, 16)), (signal.SIGKILL, (8, 20)), (signal.SIGINT, (6, 18))],
    "train": [
        (signal.SIGKILL, (15, 40)),
        (signal.SIGINT, (20, 45)),
        (signal.SIGKILL, (10, 30)),
        (signal.SIGINT, (15, 35)),
    ],
}
HINT = "interrupted. Re-run the same command to resume."


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*GENDERTUNE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _interrupt(args: list[str], signum: int, after: float) -> tuple[bool, int, str]:
    """Start the command, send `signum` `after` seconds in (if it still runs); (was it running, exit code, stderr)."""
    process = _start(args)
    try:
        process.wait(timeout=after)
        running = False
    except subprocess.TimeoutExpired:
        running = True
        process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    if signum == signal.SIGKILL:
        # The command's own Ray processes share its fate; its session group is what is left to stop.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return running, process.returncode, err


def _check_interrupted(code: int, err: str, complete: bool, context: str) -> None:
    """Ctrl-C: exit 130 with the resume hint; or, landing after the work was done (as Ray shuts
    down, when it is ignored), exit 0 with a complete output."""
    assert (code == 130 and HINT in err) or (code == 0 and complete), f"{context}: exit {code}\n{err[-2000:]}"


def _check_prep_output(out: Path, context: str) -> bool:
    """The output is absent or complete; a staging folder never sits at `out`. True if complete."""
    if not out.exists():
        return False
    prepared = open_prepared(str(out))  # manifest there and readable
    for split in prepared.splits:
        assert list((out / split).glob("*.parquet")), f"{context}: {out} looks complete but has no {split} shards"
    return True


def _check_run(out: Path, image: Path, context: str) -> None:
    """A run folder without metrics.json must be refused by predict; one with it must be whole."""
    if run_layout.is_complete(out):
        assert (out / run_layout.MODEL).is_file() and (out / run_layout.PREDICTIONS).is_file(), context
        return
    probe = _start(["predict", "--model", str(out), str(image)])
    _, err = probe.communicate(timeout=60)
    refused = "not a finished training run" in err or "has no model.pt" in err
    assert probe.returncode == 2 and refused, f"{context}: {err}"


@pytest.mark.integration
def test_prep_and_train_survive_kills_at_random_points(synthetic_sample, tmp_path):
    rng = random.Random(SEED)
    prep_out, run_out = tmp_path / "prep", tmp_path / "run"
    prep_args = [
        "prep",
        "--data",
        str(synthetic_sample.path),
        "--out",
        str(prep_out),
        "--image-size",
        "32",
        "--align",
        "none",
        "--split",
        "identity",
        "--ratios",
        "0.6,0.2,0.2",
    ]
    for number, (signum, window) in enumerate(KILLS["prep"]):
        after = rng.uniform(*window)
        context = f"prep kill {number} ({signal.Signals(signum).name} at {after:.1f}s, seed {SEED})"
        running, code, err = _interrupt(prep_args + (["--overwrite"] if prep_out.exists() else []), signum, after)
        complete = _check_prep_output(prep_out, context)
        if running and signum == signal.SIGINT:
            _check_interrupted(code, err, complete, context)
    final = _start(prep_args + (["--overwrite"] if prep_out.exists() else []))
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, f"prep re-run (seed {SEED}): {err[-2000:]}"
    assert _check_prep_output(prep_out, "re-run")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".prep")]
    assert leftovers == [], f"seed {SEED}: left behind {leftovers}"

    image = next((synthetic_sample.path / "img_align_celeba").glob("*.jpg"))
    train_args = [
        "train",
        "--data",
        str(prep_out),
        "--out",
        str(run_out),
        "--model",
        "resnet18",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--workers",
        "2",
    ]
    for number, (signum, window) in enumerate(KILLS["train"]):
        after = rng.uniform(*window)
        context = f"train kill {number} ({signal.Signals(signum).name} at {after:.1f}s, seed {SEED})"
        running, code, err = _interrupt(train_args, signum, after)
        _check_run(run_out, image, context)
        if running and signum == signal.SIGINT:
            _check_interrupted(code, err, run_layout.is_complete(run_out), context)
        if run_layout.is_complete(run_out):
            break  # it finished before the signal: nothing left to interrupt
    if not run_layout.is_complete(run_out):
        final = _start(train_args)
        _, err = final.communicate(timeout=400)
        assert final.returncode == 0, f"train re-run (seed {SEED}): {err[-2000:]}"
    _check_run(run_out, image, "re-run")
    assert run_layout.read_metrics(run_out)["epochs_run"] == 2
    assert not list(tmp_path.glob(".*.lock")), f"seed {SEED}: a lock file outlived its run"
