"""Files on local disk or gs://, through one path: fsspec (gcsfs for gs://, which honours
STORAGE_EMULATOR_HOST, so the same code runs against real GCS and a local emulator)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import posixpath
import re
import stat
import sys
import uuid
from contextlib import contextmanager
from typing import Any

import fsspec

from gptsan.errors import UserError

GCS_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"  # gcsfs's and google-cloud-storage's URL of a GCS emulator


def is_remote(path: str) -> bool:
    return "://" in str(path)


def checked(path: str) -> str:
    """`path` as a string; a gs:// path whose bucket name GCS would refuse is a UserError here, before any
    library reaches the network with it (GCS names: 3-63 characters of lowercase letters, digits, '-', '_'
    and '.', starting and ending with a letter or digit; up to 222 with dots, 63 between them)."""
    path = str(path)
    if path.startswith("gs://"):
        bucket = bucket_of(path)
        parts = bucket.split(".")
        longest = 222 if len(parts) > 1 else 63
        if not (GCS_BUCKET_NAME.fullmatch(bucket) and 3 <= len(bucket) <= longest
                and all(len(part) <= 63 for part in parts)):
            raise UserError(f"{path}: {bucket!r} is not a GCS bucket name (3-63 characters: lowercase letters, "
                            "digits, '-', '_' and '.', starting and ending with a letter or digit)")
        anonymous_with_emulator()
    return path


_anonymous_set = False  # whether fsspec's default gcsfs token is ours (anonymous_with_emulator)


def anonymous_with_emulator() -> None:
    """With STORAGE_EMULATOR_HOST set, gcsfs filesystems are made with anonymous credentials: gptsan's, and those
    Orbax makes through etils epath (fsspec's defaults for "gs" serve both), as google-cloud-storage does for an
    emulator. Without them gcsfs asked google.auth for the default credentials, which probed the GCE metadata
    server and logged "Compute Engine Metadata server unavailable ..." or "Authentication failed using Compute
    Engine authentication ..." (and, off GCE, waited for the probe's timeouts) before gcsfs went on anonymously.
    A token given to fsspec (FSSPEC_GS_TOKEN) is kept; without the variable, real GCS gets the usual credentials.
    Called before each gs:// access, so it follows the variable."""
    global _anonymous_set
    defaults = fsspec.config.conf.setdefault("gs", {})
    if os.environ.get(EMULATOR_VARIABLE, "") not in ("", "default"):  # gcsfs's test: "default" is real GCS
        if "token" not in defaults:
            defaults["token"] = "anon"
            _anonymous_set = True
    elif _anonymous_set:
        defaults.pop("token", None)
        _anonymous_set = False


class NotForTheUser(logging.Filter):
    """Drops two kinds of gcsfs log: a request that failed for good ("_request out of retries on exception: ..."
    or "... non-retriable exception: ...", each with a traceback), as gcsfs raises the same error to its caller
    and gptsan reports that in one line; and its notice that it could not tell a bucket's layout ("Could not
    determine bucket type ... falling back to GCSFileSystem", after a 60 s wait where the server is out of reach),
    as it then works as before and a real failure comes from the request itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "falling back to GCSFileSystem" in message:
            return False
        return not (record.exc_info and (" out of retries on exception: " in message
                                         or " non-retriable exception: " in message))


logging.getLogger("gcsfs").addFilter(NotForTheUser())


GCS_ENDPOINT_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")  # gcsfs's, tensorstore's


def check_gcs_endpoints(path: str, flag: str | None = None) -> None:
    """For a gs:// `path` that Orbax (tensorstore) reads or writes as well as gcsfs: both are pointed at an
    emulator or neither is. With one variable of the two set, files went to the emulator and checkpoints to
    real GCS (or the other way round): offline, the first save retried for minutes, then failed with pages of
    tracebacks, the run's steps lost; a model read or written by the other tools hung without a word."""
    if not str(path).startswith("gs://"):
        return
    given = [name for name in GCS_ENDPOINT_VARIABLES if os.environ.get(name)]
    if len(given) == 1:
        other = next(name for name in GCS_ENDPOINT_VARIABLES if name not in given)
        raise UserError(f"{_named(path, flag)}: {given[0]} is set but {other} is not, so gcsfs and tensorstore "
                        f"(Orbax) would reach different servers; set {other} to the same URL for an emulator, or unset "
                        f"{given[0]} for real GCS (docs/gcs.md)")


def check_orbax_folder(path: str, flag: str | None = None) -> None:
    """A folder that Orbax saves a checkpoint in has no `[` in its path: Orbax finds the parts it has just
    written by globbing the folder, where `out[1]` matches `out1`, not itself, so it left the checkpoint
    unmerged (no manifest) and unreadable, after reporting it saved. And `check_orbax_url`."""
    if "[" in str(path) if is_remote(path) else "[" in os.path.abspath(os.path.expanduser(str(path))):
        raise UserError(f"{_named(path, flag)}: a path with '[' is not supported (Orbax saves unreadable "
                        "checkpoints under it); give one without '['")
    check_orbax_url(path, flag)


def check_orbax_url(path: str, flag: str | None = None) -> None:
    """A gs:// folder Orbax reads or writes has no `#` or `?`: tensorstore takes the URL's rest from them on as a
    fragment or query, so `gs://b/m#1` kept its arrays in `gs://b/m/`, shared with every other such folder there
    (a model then read another's weights, with no error). And both servers' variables agree
    (`check_gcs_endpoints`)."""
    if is_remote(path) and (mark := next((c for c in "#?" if c in str(path)), None)):
        raise UserError(f"{_named(path, flag)}: a gs:// path with '{mark}' is not supported (tensorstore, which "
                        "Orbax reads and writes through, takes it as the end of the object name); give one without "
                        "'#' or '?'")
    check_gcs_endpoints(path, flag)


def _named(path: str, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def filesystem(path: str):
    """The fsspec filesystem for `path` and the path as that filesystem names it (no glob expansion)."""
    return fsspec.core.url_to_fs(checked(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(str(base), *parts) if is_remote(base) else os.path.join(str(base), *parts)


def absolute(path: str) -> str:
    """`path` with a local one made absolute (Orbax reads and writes only absolute paths)."""
    return checked(path) if is_remote(path) else os.path.abspath(path)


def parent(path: str) -> str:
    """The folder holding `path` (local paths made absolute first)."""
    return posixpath.dirname(str(path)) if is_remote(path) else os.path.dirname(absolute(path))


@contextmanager
def remote_errors_named(path: str):
    """gcsfs's errors name no file (a server out of reach is aiohttp's ClientConnectorError, an OSError without a
    filename): within this block they get `path` and what failed (`remote_failure`), so a tool says it in one
    line. A missing file stays a FileNotFoundError, for the caller to name what it expected."""
    try:
        yield
    except OSError as err:
        if isinstance(err, FileNotFoundError) or err.filename is not None or not is_remote(path):
            raise
        raise OSError(err.errno, remote_failure(path, err), path) from None


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    with remote_errors_named(path):
        return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    with remote_errors_named(path):
        return fs.isdir(p)


def read_text(path: str) -> str:
    with remote_errors_named(path), fsspec.open(checked(path), "r", encoding="utf-8") as f:
        text = f.read()
    if not text:
        refuse_remote_folder(path)
    return text


def refuse_remote_folder(path: str) -> None:
    """An IsADirectoryError for a gs:// "folder" (a prefix of objects) read as a file, as a local folder raises:
    gcsfs opens it as an empty file, so a folder given as a vocabulary or --parameter_file was "empty" or "not
    valid JSON"."""
    if is_remote(path) and isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))


def read_json(path: str) -> Any:
    """A JSON file's value. Text that is not UTF-8, or not JSON, is a UserError naming the file (a missing file
    raises FileNotFoundError, for the caller to name what it expected)."""
    try:
        return json.loads(read_text(path))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_bytes(path: str) -> bytes:
    with remote_errors_named(path), fsspec.open(checked(path), "rb") as f:
        data = f.read()
    if not data:
        refuse_remote_folder(path)
    return data


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file so that readers never see a partial one (`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a file so that readers never see a partial one.

    Remote (gs://): one object upload, which GCS makes visible only once complete, so no temp name is
    needed (and object stores have no rename: a "move" is a copy plus a delete). Local: the missing folders
    made, a temp name in the same folder, then an atomic rename. A symbolic link is followed (the rename
    replaces the file it points to, not the link), and what is not a regular file (/dev/stdout, a pipe, a
    device) is written to directly, as it cannot be replaced. An error names `path`, not the temp name.
    """
    fs, p = filesystem(path)
    if is_remote(path):
        try:
            fs.pipe_file(p, data)
        except OSError as err:  # gcsfs's errors name no file (a missing bucket's only its upload URL)
            raise OSError(err.errno, remote_failure(path, err), path) from None
        return
    if os.path.exists(p) and not stat.S_ISREG(os.stat(p).st_mode):
        try:  # opened as named: /dev/stdout's link leads to a pipe ("pipe:[N]"), which has no path of its own
            with open(p, "wb") as f:
                f.write(data)
        except OSError as err:  # /dev/full; a closed pipe stays a BrokenPipeError
            raise type(err)(err.errno, err.strerror, path) from None
        return
    target = os.path.realpath(p)
    made = missing_folders(os.path.dirname(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException as err:  # a Ctrl-C too: no temp file left, nor the folders made for it
        with contextlib.suppress(OSError):
            os.remove(tmp)
        with contextlib.suppress(OSError):  # innermost first; one another writer filled in the meantime stays
            for folder in made:
                os.rmdir(folder)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, path) from None
        raise


def status_stream(output: str):
    """Where a tool's status line about writing `output` goes: stdout, or stderr when `output` is stdout itself
    (`--output /dev/stdout`, or the file stdout is redirected to), where the line would land inside the data."""
    if not is_remote(output):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no such file yet; stdout without a file
            if os.path.samestat(os.stat(output), os.fstat(sys.stdout.fileno())):
                return sys.stderr
    return sys.stdout


def missing_folders(folder: str) -> list[str]:
    """The folders that making the local `folder` would make, innermost (`folder`) first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent_folder = os.path.dirname(folder)
        if parent_folder == folder:
            break
        folder = parent_folder
    return missing


PERMISSION_REFUSED = re.compile(r"\b(401|403)\b|Forbidden|PERMISSION_DENIED|UNAUTHENTICATED")
UNREACHABLE = re.compile(r"Cannot connect to host|Connect call failed|UNAVAILABLE|Couldn't connect|Connection refused")


def remote_failure(path: str, *errors: BaseException) -> str:
    """What failed gs:// reads or writes under `path` met, in a few words, from the errors gcsfs, tensorstore or
    Orbax raised or logged (and those they were raised from): permission refused, the server out of reach, or the
    bucket missing (deleted during a run, say: gcsfs's error then names only an upload URL, and Orbax's later
    steps fail on what is missing); else the first error's first line."""
    chain = [cause for err in errors for cause in causes(err)]
    for err in chain:
        if isinstance(err, PermissionError) or PERMISSION_REFUSED.search(str(err)):
            return f"permission refused ({first_line(err)})"
    for err in chain:
        if isinstance(err, ConnectionError) or UNREACHABLE.search(str(err)):
            return f"cannot reach the storage server ({first_line(err)})"
    bucket = bucket_of(path)
    try:
        fs, _ = filesystem(path)
        fs.invalidate_cache()
        missing = not fs.exists(bucket)
    except Exception:  # no answer: say what was reported
        missing = False
    return f"bucket {bucket} does not exist (deleted?)" if missing else first_line(chain[0])


def bucket_of(path: str) -> str:
    """The bucket of a remote `path` (`gs://BUCKET/...`)."""
    return str(path).split("://", 1)[-1].split("/", 1)[0]


def causes(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling, outermost first."""
    chain = []
    while err is not None and err not in chain and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def first_line(err: BaseException) -> str:
    """An error's message as one short line (tensorstore's spec and source locations left out)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    return without_tensorstore_details(text.splitlines()[0])[:200]


def without_tensorstore_details(text: str) -> str:
    """A tensorstore status message without the ` [tensorstore_spec='...']` and ` [source locations=...]` it ends
    with."""
    return re.split(r" \[(?:tensorstore_spec|source locations)", text, maxsplit=1)[0]


def check_output_file(path: str, flag: str) -> None:
    """Fail before any work if `flag`'s `path` cannot be written as a file: a folder is there, or (local) the
    nearest existing folder above it is a file or not writable. Missing folders are made when it is written."""
    if isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    check_output_parent(path, flag)


def check_output_parent(path: str, flag: str) -> None:
    """Fail before any work if (local) the nearest existing folder above `flag`'s `path` is a file or not
    writable: the folders missing in between are made when `path` is written; or (gs://) its bucket is not
    there."""
    if is_remote(path):
        bucket = bucket_of(path)
        if str(path).startswith("gs://") and not exists(f"gs://{bucket}"):  # found after the work, it was an
            raise UserError(f"{flag} {path}: bucket {bucket} does not exist")  # upload URL's traceback (encode)
        return
    folder = parent(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {folder}")


def folder_names(path: str, files_only: bool = False) -> list[str]:
    """The sorted names (last parts) of what the folder `path` holds, or of its files only. Listed, not
    globbed: `[` `]` in the folder's name are literal."""
    fs, folder = filesystem(path)
    with remote_errors_named(path):
        entries = fs.ls(folder, detail=True)
    return sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries
                  if not files_only or entry.get("type") == "file")


def glob(pattern: str) -> list[str]:
    """Sorted files matching a glob (folders left out), with the protocol kept for remote paths. A file whose
    name is exactly `pattern` is that file alone, glob characters and all (`doc[1].txt`, `list [v2].csv`):
    `pattern` is a glob only when no file has that name."""
    return [path for path, _ in glob_sizes(pattern)]


def glob_sizes(pattern: str) -> list[tuple[str, int]]:
    """`glob(pattern)` with each file's size in bytes (from the same listing). A bucket that does not exist
    holds no file; one that may not be listed is a UserError (gcsfs raised both without a file name, so they
    reached the user as tracebacks)."""
    fs, p = filesystem(pattern)
    try:
        if fs.isfile(p):
            matches = [(p, int(fs.size(p) or 0))]
        else:
            matches = sorted((path, int(info.get("size") or 0)) for path, info in fs.glob(p, detail=True).items()
                             if info.get("type") != "directory")
    except FileNotFoundError:  # gcsfs: no such bucket
        matches = []
    except OSError as err:
        if err.filename is not None or not is_remote(pattern):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__  # gcsfs: "Forbidden: b/NAME/o"
        raise UserError(f"{pattern}: cannot list the files it names ({reason})") from None
    if is_remote(pattern):
        protocol = str(pattern).split("://", 1)[0]
        return [(f"{protocol}://{m}", size) for m, size in matches]
    return matches


READ_BUFFER_BYTES = 8 << 20


@contextmanager
def open_file(path: str, mode: str = "rb"):
    """A file object; remote binary reads go through an 8 MiB buffer, so record-by-record readers make one
    object-store call per buffer rather than one per small read (each of which costs a round of gcsfs's
    event-loop machinery)."""
    if mode.startswith("r"):
        refuse_remote_folder(path)
    with remote_errors_named(path), fsspec.open(checked(path), mode) as f:
        yield io.BufferedReader(f, READ_BUFFER_BYTES) if mode == "rb" and is_remote(path) else f
