"""All-or-nothing output directories: write into a temporary sibling, rename onto the destination at the end.

On gs:// (no atomic directory rename) the destination is written directly, and the writer writes its commit
marker (parameters.json) last; a failure removes what was written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from gptsan import storage
from gptsan.errors import UserError


def refuse_existing(dst: str, flag: str = "--output") -> None:
    if not str(dst):  # the current folder, to fsspec: "already exists" said nothing useful
        raise UserError(f"{flag}: expected the path of a new folder, got an empty one")
    if storage.exists(str(dst)):
        raise UserError(f"{flag} {dst}: already exists; refusing to overwrite it (choose a new path)")


@contextmanager
def staged_output(dst: str, flag: str = "--output") -> Iterator[str]:
    """Yield a directory to write into; it becomes `dst` only if the block finishes without error. A write error
    that names no file (a full disk, as fsspec and the TF writer report it) is a UserError naming `dst`."""
    dst = str(dst)
    refuse_existing(dst, flag)
    if storage.is_remote(dst):
        storage.check_output_parent(dst, flag)  # its bucket, before the work
        fs, path = storage.filesystem(dst)
        try:
            yield dst
        except BaseException as err:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            raise _named(err, flag, dst) from None
        return
    storage.check_output_parent(dst, flag)
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    except OSError as err:  # a folder the system does not let us write in (/proc, a read-only mount)
        raise UserError(f"{flag} {dst}: cannot write in {parent}: {err.strerror or err}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(err, flag, dst) from None


def _named(err: BaseException, flag: str, dst: str) -> BaseException:
    """A write error that names no file (a full disk, as fsspec and the TF writer report it) as a UserError naming
    the output; any other error as it is."""
    if isinstance(err, OSError) and err.filename is None:
        # gcsfs's name an upload URL (`http://.../upload/storage/v1/b/BUCKET/o?name=...`): say what failed
        what = storage.remote_failure(dst, err) if storage.is_remote(dst) else err.strerror or err
        return UserError(f"{flag} {dst}: {what}")
    return err
