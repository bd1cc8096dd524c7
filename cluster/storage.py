"""Where the stages read and write: a local folder (a path or file://) or an object-store URI
(s3://, gs://, or any scheme pyarrow's filesystems know), through one API, and outputs that appear
complete or not at all.

Every location goes through `resolve`: pyarrow.fs picks the filesystem (LocalFileSystem for a
local path, made absolute first), so reading, writing and listing work the same on both. The two
kinds differ where an output is built, and that difference lives in `output_location` and
`fresh_output` (besides: a local file needs its folder created, `_output_stream`):
- A local output is built in a hidden sibling (`.NAME.partial-XXXX`) and renamed into place when
  everything is written. A rename within one filesystem is atomic, so a run that is killed half-way
  leaves a `.partial` folder that no reader mistakes for a finished result, and a re-run starts clean.
- An object store has no rename. A multi-node run needs its outputs where every node can reach
  them, so Ray Train and Tune get the URI as their storage_path (every worker uploads its
  checkpoints there itself) and prep's decode tasks write their Parquet shards there directly. The
  driver's own files (configs, metrics, CSVs, figures, model.pt) are built in a local working
  folder and uploaded when the stage ends, the stage's completion markers last: whoever sees a
  marker sees every file it vouches for. The stage names its markers; this module knows no stage's
  files. A run that stops early still uploads what it has (its config, which a resume checks),
  never a marker it did not write. Before the stage starts, the small files already at the URI
  (*.json, *.csv) are fetched, so resuming works exactly as with a local folder.
Credentials and endpoints come from the environment, as for any pyarrow or AWS client:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, AWS_ENDPOINT_URL for MinIO and other
S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS for gs://. Every Ray node needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from gendertune.base.errors import GendertuneError, MissingInputError, UserInputError


OWNER_FILE = ".owner"
IN_PROGRESS = ".gendertune-incomplete"
FETCHED_SUFFIXES = (".json", ".csv")


class OutputExistsError(GendertuneError, FileExistsError):
    """The output path already holds a result and the user did not ask to replace it."""


class StorageURIError(UserInputError):
    """A URI that pyarrow cannot open (unknown scheme, missing bucket, bad credentials...)."""


def is_uri(location: str | Path | None) -> bool:
    """True for `scheme://...` other than file://; local paths (and file://) are plain folders."""
    scheme, separator, _ = str(location or "").partition("://")
    return bool(separator) and scheme.isalnum() and scheme.lower() != "file"


def absolute(location: str | Path) -> str:
    """A URI as given (without a trailing slash), a local path (or file:// URI) as an absolute
    path: what every node and every later message should see."""
    if is_uri(location):
        return str(location).rstrip("/")
    return str(Path(str(location).removeprefix("file://")).absolute())


def join(base: str | Path, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location, with a clear error when pyarrow can't open it."""
    try:
        return pafs.FileSystem.from_uri(absolute(location))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageURIError(
            f"{location}: cannot open this storage URI ({err}). Check the scheme (s3://, gs://), the bucket, and "
            "the credentials/endpoint in the environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from err


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise MissingInputError(f"{location} does not exist") from err


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


@contextlib.contextmanager
def open_output(location: str | Path) -> Iterator[pa.NativeFile]:
    """A stream that becomes the file (or object) at `location`; an object store makes a single
    upload visible all at once."""
    with _output_stream(*resolve(location)) as stream:
        yield stream


def write_bytes(location: str | Path, data: bytes) -> None:
    with open_output(location) as stream:
        stream.write(data)


def _output_stream(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    # A local file needs its folder to exist. An object store has no folders: a key needs no
    # parent, and create_dir there would only add empty "folder/" objects.
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return fs.open_output_stream(path)


def list_files(location: str | Path) -> list[str]:
    """Paths relative to `location` of every file below it ([] when there is nothing)."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(info.path[len(root):].lstrip("/") for info in infos if info.type == pafs.FileType.File)


def delete_tree(location: str | Path) -> None:
    """Delete everything below `location` (the folder itself stays, if the filesystem has one)."""
    fs, root = resolve(location)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        fs.delete_dir_contents(root, missing_dir_ok=True)


def download_small_files(location: str, local: Path, *, skip_dirs: Collection[str]) -> None:
    """Copy the *.json/*.csv below `location` into `local`, leaving out Ray's own storage folders."""
    fs, root = resolve(location)
    skip_dirs = set(skip_dirs)
    for relative in list_files(location):
        parts = relative.split("/")
        if relative.endswith(FETCHED_SUFFIXES) and not skip_dirs.intersection(parts[:-1]):
            with fs.open_input_stream(f"{root}/{relative}") as stream:
                data = stream.read()
            target = local.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def upload_order(relatives: list[str], *, markers: Collection[str]) -> list[str]:
    """Every file before any of the completion `markers` (file names); markers of inner folders
    before outer ones."""
    return sorted(relatives, key=lambda r: (r.rsplit("/", 1)[-1] in markers, -r.count("/"), r))


def upload_tree(local: Path, location: str, *, markers: Collection[str]) -> None:
    """Copy the files below the local folder `local` to `location`, in upload_order."""
    fs, root = resolve(location)
    relatives = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    for relative in upload_order(relatives, markers=markers):
        with _output_stream(fs, f"{root}/{relative}") as stream:
            stream.write((local / relative).read_bytes())


@dataclasses.dataclass(frozen=True)
class OutputLocation:
    """Where a stage writes: `local` for its own files, `storage` for Ray Train/Tune and for what
    the user is told (the same folder locally; the URI otherwise)."""

    local: Path
    storage: str

    def storage_path(self, *parts: str) -> str:
        return join(self.storage, *parts)


@contextlib.contextmanager
def output_location(out: str, *, markers: Collection[str], ray_dirs: Collection[str] = ()) -> Iterator[OutputLocation]:
    """A folder the stage adds to (a resume finds what an earlier run wrote): a local folder as
    is; a URI through a local working folder that is uploaded at the end, `markers` (the stage's
    completion files) last. `ray_dirs` are the folders Ray writes to the URI itself, not fetched."""
    out = absolute(out)
    if not is_uri(out):
        yield OutputLocation(local=Path(out), storage=out)
        return
    workdir = Path(tempfile.mkdtemp(prefix="gendertune-out-"))
    try:
        download_small_files(out, workdir, skip_dirs=ray_dirs)
        try:
            yield OutputLocation(local=workdir, storage=out)
        finally:
            upload_tree(workdir, out, markers=markers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def fresh_output(out: str, *, marker: str, overwrite: bool = False) -> Iterator[OutputLocation]:
    """A new output that appears complete or not at all, `marker` being a file every complete
    output of this kind contains (see atomic_output_dir). A folder is atomic_output_dir's staging
    folder. An object store has no rename, so for a URI an in-progress object goes first, the
    stage's tasks write there directly (location.storage), the driver's files are uploaded on
    success with `marker` last, and a re-run clears a prefix it finds marked in progress. Replacing
    a finished output (overwrite) deletes it first: there is no moment-of-swap on an object store."""
    out = absolute(out)
    if not is_uri(out):
        with atomic_output_dir(out, marker=marker, overwrite=overwrite) as staging:
            yield OutputLocation(local=staging, storage=str(staging))
        return
    existing = list_files(out)
    if existing:
        if marker in existing and not overwrite:
            raise OutputExistsError(f"{out} already holds a result; choose another --out or pass --overwrite to replace it")
        if marker not in existing and IN_PROGRESS not in existing:
            raise OutputExistsError(f"{out} holds other objects and is not a gendertune output (no {marker}); "
                                    "refusing to replace it — choose another --out")
        delete_tree(out)  # a finished output being replaced, or an interrupted run of ours
    write_bytes(join(out, IN_PROGRESS), b"")
    workdir = Path(tempfile.mkdtemp(prefix="gendertune-out-"))
    try:
        yield OutputLocation(local=workdir, storage=out)
        upload_tree(workdir, out, markers=(marker,))
        fs, path = resolve(join(out, IN_PROGRESS))
        fs.delete_file(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, *, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes the local folder `final` when the block exits cleanly.

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
    """Write a local file via a temporary sibling and rename, so readers never see half of it
    (the stages' own files, in OutputLocation.local)."""
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
