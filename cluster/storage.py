"""Atomic outputs: a result directory or file appears complete or not at all.

Every stage builds its output in a hidden sibling (`.NAME.partial-XXXX`) and renames it into
place only when everything is written. A rename within one filesystem is atomic, so a run that is
killed half-way leaves a `.partial` directory that no reader mistakes for a finished result, and a
re-run starts clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gendertune.errors import GendertuneError


OWNER_FILE = ".owner"


class OutputExistsError(GendertuneError, FileExistsError):
    """The output path already holds a result and the user did not ask to replace it."""


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, *, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes `final` when the block exits cleanly.

    `marker` is a file every complete output of this kind contains: `overwrite` replaces only a
    directory holding it, so a mistyped --out can never delete a folder of the user's own data.
    """
    final = Path(final).absolute()
    if final.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{final} already exists; choose another --out or pass --overwrite to replace it"
            )
        if not (final / marker).is_file():
            raise OutputExistsError(
                f"{final} exists and is not a gendertune output (no {marker}); "
                "refusing to replace it — choose another --out"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(final)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    # Who is writing it: a run killed too hard to clean up (SIGKILL, a lost node) leaves the folder
    # behind, and the next run removes it once this process is gone.
    (staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / OWNER_FILE).unlink()
    if final.exists():
        # Move the old result aside first so `final` is never missing a complete version for
        # longer than two renames, then drop the old one.
        retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)


def remove_abandoned_staging(final: Path) -> list[Path]:
    """Delete the staging folders of `final` whose writer, on this host, no longer runs; a folder
    another host writes, or one without an owner file, is left alone. Returns what was removed."""
    removed = []
    for staging in final.parent.glob(f".{final.name}.partial-*"):
        try:
            host, pid = (staging / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and not _running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        # mkstemp creates 0600 files; results are meant to be shared like any other output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
