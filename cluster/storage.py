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
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
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
# "Is this folder ours?" is answered by this file, holding our JSON, never by a common file name
# (a web app has a manifest.json too): replacing or resuming into a folder requires it.
OUTPUT_MARKER = ".gendertune-output"
OUTPUT_MARKER_FORMAT = 1
# An object store has no lock that the system drops when its holder dies. A lease does the same job:
# the holder renews it every LEASE_S / 3 seconds, and a lease not renewed for LEASE_S is a dead
# run's, which the next run takes over. Two runs that start within the same moment both write a
# lease; the later write wins, and each reads its lease back LEASE_SETTLE_S after writing it, far
# longer than the gap between checking for a lease and writing one.
LEASE_S = 60.0
LEASE_SETTLE_S = 1.0


class OutputExistsError(GendertuneError, FileExistsError):
    """The output path already holds a result and the user did not ask to replace it."""


class OutputBusyError(UserInputError):
    """Another gendertune run is writing the same output right now."""


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
    return sorted(info.path[len(root) :].lstrip("/") for info in infos if info.type == pafs.FileType.File)


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


def marker_text(stage: str) -> str:
    return json.dumps({"gendertune_output": stage, "format": OUTPUT_MARKER_FORMAT}) + "\n"


def output_stage(folder: str | Path) -> str | None:
    """The stage that wrote the local folder `folder` according to its OUTPUT_MARKER, or None when
    it has no marker of ours (a folder of the user's own files)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != OUTPUT_MARKER_FORMAT:
        return None
    stage = marker.get("gendertune_output")
    return stage if isinstance(stage, str) else None


def claim_folder(folder: Path, stage: str) -> None:
    """Create the local output folder `folder` (if needed) and mark it as the `stage`'s output."""
    folder.mkdir(parents=True, exist_ok=True)
    if output_stage(folder) != stage:
        write_text_atomic(folder / OUTPUT_MARKER, marker_text(stage))


def require_writable(folder: Path) -> None:
    """Refuse, before any work, a local output folder that could never be created or written:
    its nearest existing ancestor must be a folder this process may write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputExistsError(f"{folder}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(
            f"{folder}: {existing} is not writable (permissions, or a read-only file system); choose another --out"
        )


def require_ours(folder: Path, stage: str) -> None:
    """Refuse to write into an existing local folder that holds files but is not a `stage` output."""
    require_writable(folder if folder.is_dir() else folder.parent)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} is a file, not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and output_stage(folder) != stage:
        raise OutputExistsError(
            f"{folder} holds files and is not a gendertune {stage} output (no {OUTPUT_MARKER}); "
            "refusing to write into it — choose another --out"
        )


@contextlib.contextmanager
def exclusive(final: Path) -> Iterator[None]:
    """Refuse a second writer of the local output `final` while this block runs: an flock on the
    sibling `.NAME.lock`, which the kernel releases when its holder dies, however it dies."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"{final} is being written by another gendertune run (lock {path}); "
                "wait for it to finish or choose another --out"
            ) from None
        # The holder unlinks the file as it finishes; a lock on that unlinked file guards nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def lease_location(out: str) -> str:
    """The lease object of the URI output `out`: the sibling `.NAME.lock`, as a local lock file is,
    so it is never one of the output's own objects."""
    scheme, _, rest = absolute(out).partition("://")
    parent, _, name = rest.rpartition("/")
    if not parent:
        raise UserInputError(f"{out}: an output needs a prefix inside the bucket, e.g. {out.rstrip('/')}/run1")
    return f"{scheme}://{parent}/.{name}.lock"


def _read_lease(location: str) -> dict | None:
    try:
        lease = json.loads(read_text(location))
    except (MissingInputError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _lease_age(lease: dict) -> float:
    return time.time() - float(lease.get("renewed_at", 0))


def _busy(out: str, lease: dict, lease_s: float) -> OutputBusyError:
    age = _lease_age(lease)
    return OutputBusyError(
        f"{out} is being written by another gendertune run ({lease.get('holder', '?')}, lease "
        f"{lease_location(out)} renewed {max(age, 0):.0f} s ago); wait for it to finish or choose another "
        f"--out (a lease not renewed for {lease_s:.0f} s is a dead run's and is taken over)"
    )


@contextlib.contextmanager
def exclusive_uri(out: str, *, lease_s: float = LEASE_S, settle_s: float = LEASE_SETTLE_S) -> Iterator[None]:
    """Refuse a second writer of the URI output `out` while this block runs: a lease object that a
    background thread renews, deleted when the block ends (see LEASE_S)."""
    location = lease_location(out)
    token = uuid.uuid4().hex
    held = _read_lease(location)
    if held and _lease_age(held) < lease_s:
        raise _busy(out, held, lease_s)

    def write() -> None:
        holder = f"{socket.gethostname()} pid {os.getpid()}"
        write_bytes(location, json.dumps({"token": token, "holder": holder, "renewed_at": time.time()}).encode())

    write()
    time.sleep(settle_s)
    held = _read_lease(location)
    if not held or held.get("token") != token:  # another run wrote its lease after ours
        raise _busy(out, held or {}, lease_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            if (_read_lease(location) or {}).get("token") != token:
                return  # taken over after this process stalled for a whole lease: renewing would steal it back
            write()

    renewer = threading.Thread(target=renew, name="gendertune-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if (_read_lease(location) or {}).get("token") == token:
            fs, path = resolve(location)
            fs.delete_file(path)


@dataclasses.dataclass(frozen=True)
class OutputLocation:
    """Where a stage writes: `local` for its own files, `storage` for Ray Train/Tune and for what
    the user is told (the same folder locally; the URI otherwise)."""

    local: Path
    storage: str

    def storage_path(self, *parts: str) -> str:
        return join(self.storage, *parts)


@contextlib.contextmanager
def output_location(
    out: str, *, stage: str, markers: Collection[str], ray_dirs: Collection[str] = ()
) -> Iterator[OutputLocation]:
    """A folder the stage adds to (a resume finds what an earlier run wrote): a local folder as
    is, if it is empty or the `stage`'s own (the stage marks it with claim_folder when it starts
    writing), and only one run at a time; a URI likewise (marked as the stage's when found empty),
    through a local working folder that is uploaded at the end, `markers` (the stage's completion
    files) last. `ray_dirs` are the folders Ray writes
    to the URI itself, not fetched."""
    out = absolute(out)
    if not is_uri(out):
        require_ours(Path(out), stage)
        with exclusive(Path(out)):
            require_ours(Path(out), stage)  # what it holds now that no one else writes it
            yield OutputLocation(local=Path(out), storage=out)
        return
    workdir = Path(tempfile.mkdtemp(prefix="gendertune-out-"))
    try:
        with exclusive_uri(out):
            # Our marker is one small read; only a prefix without it is listed (a resume's prefix
            # holds every checkpoint Ray wrote).
            owner = _uri_stage(out)
            if owner is None and not list_files(out):
                # Claimed before anything is written: Ray writes checkpoints there directly, and a run
                # killed before its end-of-stage upload must still be recognised as ours on resume.
                write_bytes(join(out, OUTPUT_MARKER), marker_text(stage).encode())
            elif owner != stage:
                raise OutputExistsError(
                    f"{out} holds objects and is not a gendertune {stage} output (no {OUTPUT_MARKER}); "
                    "refusing to write into it — choose another --out"
                )
            download_small_files(out, workdir, skip_dirs=ray_dirs)
            try:
                yield OutputLocation(local=workdir, storage=out)
            finally:
                upload_tree(workdir, out, markers=markers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def fresh_output(out: str, *, stage: str, marker: str, overwrite: bool = False) -> Iterator[OutputLocation]:
    """A new output that appears complete or not at all, `marker` being a file every complete
    output of this kind contains (see atomic_output_dir). A folder is atomic_output_dir's staging
    folder. An object store has no rename, so for a URI an in-progress object goes first, the
    stage's tasks write there directly (location.storage), the driver's files are uploaded on
    success with `marker` last, and a re-run clears a prefix it finds marked in progress. Replacing
    a finished output (overwrite) deletes it first: there is no moment-of-swap on an object store."""
    out = absolute(out)
    if not is_uri(out):
        with atomic_output_dir(out, stage=stage, marker=marker, overwrite=overwrite) as staging:
            yield OutputLocation(local=staging, storage=str(staging))
        return
    with exclusive_uri(out):
        existing = list_files(out)
        if existing:
            if marker in existing and not overwrite:
                raise OutputExistsError(
                    f"{out} already holds a result; choose another --out or pass --overwrite to replace it"
                )
            if OUTPUT_MARKER not in existing or _uri_stage(out) != stage:
                raise OutputExistsError(
                    f"{out} holds other objects and is not a gendertune {stage} output (no "
                    f"{OUTPUT_MARKER}); refusing to replace it — choose another --out"
                )
            delete_tree(out)  # a finished output being replaced, or an interrupted run of ours
        write_bytes(join(out, IN_PROGRESS), b"")
        write_bytes(join(out, OUTPUT_MARKER), marker_text(stage).encode())
        workdir = Path(tempfile.mkdtemp(prefix="gendertune-out-"))
        try:
            yield OutputLocation(local=workdir, storage=out)
            upload_tree(workdir, out, markers=(marker,))
            fs, path = resolve(join(out, IN_PROGRESS))
            fs.delete_file(path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _uri_stage(out: str) -> str | None:
    try:
        marker = json.loads(read_text(join(out, OUTPUT_MARKER)))
    except (OSError, ValueError):
        return None
    return (
        marker.get("gendertune_output")
        if isinstance(marker, dict) and marker.get("format") == OUTPUT_MARKER_FORMAT
        else None
    )


def check_replaceable(final: Path, *, stage: str, marker: str, overwrite: bool) -> None:
    """Raise unless the local folder `final` may become a new `stage` output: it does not exist,
    or --overwrite was given and it is a finished output of that stage (its OUTPUT_MARKER and its
    completion `marker`), so a mistyped --out can never delete a folder of the user's own data."""
    if not final.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{final} already exists; choose another --out or pass --overwrite to replace it")
    if output_stage(final) != stage or not (final / marker).is_file():
        raise OutputExistsError(
            f"{final} exists and is not a finished gendertune {stage} output (no {OUTPUT_MARKER}"
            f" or no {marker}); refusing to replace it — choose another --out"
        )


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, *, stage: str, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes the local folder `final` when the block exits
    cleanly; one writer at a time (exclusive). The staging folder holds the `stage`'s OUTPUT_MARKER
    from the start; `marker` is the file every complete output of this kind holds (check_replaceable)."""
    final = Path(final).absolute()
    require_writable(final.parent)
    check_replaceable(final, stage=stage, marker=marker, overwrite=overwrite)
    with exclusive(final):
        check_replaceable(final, stage=stage, marker=marker, overwrite=overwrite)
        with _staged(final, stage) as staging:
            yield staging


@contextlib.contextmanager
def _staged(final: Path, stage: str) -> Iterator[Path]:
    remove_abandoned_staging(final)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    # Who is writing it: a run killed too hard to clean up (SIGKILL, a lost node) leaves the folder
    # behind, and the next run removes it once this process is gone.
    (staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    (staging / OUTPUT_MARKER).write_text(marker_text(stage))
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
