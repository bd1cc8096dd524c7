"""Object-store URIs (s3://, gs://, or any scheme pyarrow's filesystems know) for --data and --out.

A multi-node run needs its outputs where every node can reach them. With a URI:
- Ray Train and Tune get the URI as their storage_path, so every worker, on any node, uploads its
  checkpoints there itself; prep's decode tasks write their Parquet shards there directly.
- The driver's own files (configs, metrics, CSVs, figures, model.pt) are built in a local working
  folder (`output_location`) and uploaded when the stage ends, completion markers last: whoever
  sees a marker (metrics.json, manifest.json, leaderboard.*) sees every file it vouches for. A run
  that stops early still uploads what it has (its config, which a resume checks), never a marker
  it did not write. Before the stage starts, the small files already at the URI (*.json, *.csv)
  are fetched, so resuming works exactly as with a local folder.
Credentials and endpoints come from the environment, as for any pyarrow or AWS client:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, AWS_ENDPOINT_URL for MinIO and other
S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS for gs://. Every Ray node needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from gendertune.errors import MissingInputError, UserInputError
from cluster.storage import OutputExistsError, atomic_output_dir

COMPLETION_MARKERS = frozenset({"metrics.json", "manifest.json", "leaderboard.csv", "leaderboard.json", "leaderboard.md"})
FETCHED_SUFFIXES = (".json", ".csv")


class StorageURIError(UserInputError):
    """A URI that pyarrow cannot open (unknown scheme, missing bucket, bad credentials...)."""


def is_uri(path: str | Path | None) -> bool:
    """True for `scheme://...` other than file://; local paths (and file://) are plain folders."""
    scheme, separator, _ = str(path or "").partition("://")
    return bool(separator) and scheme.isalnum() and scheme.lower() != "file"


def absolute(location: str | Path) -> str:
    """A URI as given (without a trailing slash), a local path made absolute: what every node and
    every later message should see."""
    return str(location).rstrip("/") if is_uri(location) else str(Path(location).absolute())


def join(base: str | Path, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI, with a clear error when pyarrow can't open it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageURIError(
            f"{uri}: cannot open this storage URI ({err}). Check the scheme (s3://, gs://), the bucket, and "
            "the credentials/endpoint in the environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from err


def filesystem_for(location: str) -> pafs.FileSystem:
    """The filesystem a Ray storage path lives on: the URI's, or the local one."""
    return resolve(location)[0] if is_uri(location) else pafs.LocalFileSystem()


def is_file(location: str | Path) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    fs, path = resolve(str(location))
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = resolve(str(location))
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise MissingInputError(f"{location} does not exist") from err


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """One object (or local file); an object store makes a single upload visible all at once."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_bytes(data)
        return
    _put(*resolve(location), data)


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def list_files(uri: str) -> list[str]:
    """Paths relative to `uri` of every object below it ([] when there is nothing)."""
    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(info.path[len(root):].lstrip("/") for info in infos if info.type == pafs.FileType.File)


def delete_tree(uri: str) -> None:
    fs, root = resolve(uri)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        fs.delete_dir_contents(root, missing_dir_ok=True)


def download_small_files(uri: str, local: Path, *, skip_dirs: frozenset[str]) -> None:
    """Copy the *.json/*.csv below `uri` into `local`, leaving out Ray's own storage folders."""
    fs, root = resolve(uri)
    for relative in list_files(uri):
        parts = relative.split("/")
        if relative.endswith(FETCHED_SUFFIXES) and not skip_dirs.intersection(parts[:-1]):
            target = local.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{relative}") as stream:
                target.write_bytes(stream.read())


def upload_order(relatives: list[str]) -> list[str]:
    """Every file before any completion marker; markers of inner folders before outer ones."""
    return sorted(relatives, key=lambda r: (r.rsplit("/", 1)[-1] in COMPLETION_MARKERS, -r.count("/"), r))


def upload_tree(local: Path, uri: str) -> None:
    fs, root = resolve(uri)
    relatives = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    for relative in upload_order(relatives):
        _put(fs, f"{root}/{relative}", (local / relative).read_bytes())


@dataclasses.dataclass(frozen=True)
class OutputLocation:
    """Where a stage writes: `local` for its own files, `storage` for Ray Train/Tune and for what
    the user is told (the same folder locally; the URI otherwise)."""

    local: Path
    storage: str

    def storage_path(self, *parts: str) -> str:
        return join(self.storage, *parts)


@contextlib.contextmanager
def output_location(out: str, *, ray_dirs: frozenset[str] = frozenset()) -> Iterator[OutputLocation]:
    """A local folder as is; a URI through a local working folder that is uploaded at the end."""
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
            upload_tree(workdir, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


IN_PROGRESS = ".gendertune-incomplete"


@contextlib.contextmanager
def fresh_output(out: str, *, marker: str, overwrite: bool = False) -> Iterator[OutputLocation]:
    """A new output that appears complete or not at all: cluster.storage.atomic_output_dir for a
    folder. An object store has no rename, so for a URI an in-progress object goes first, the
    stage's tasks write there directly (location.storage), the driver's files are uploaded on
    success with `marker` last, and a re-run clears a prefix it finds marked in progress. Replacing
    a finished output (overwrite) deletes it first: there is no moment-of-swap on an object store."""
    if not is_uri(out):
        with atomic_output_dir(out, marker=marker, overwrite=overwrite) as staging:
            yield OutputLocation(local=staging, storage=str(staging))
        return
    out = absolute(out)
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
        upload_tree(workdir, out)
        fs, path = resolve(join(out, IN_PROGRESS))
        fs.delete_file(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
