"""One training run at a time in an output_dir.

Two runs writing the same output_dir (the same command started twice, say) both save checkpoints of the same
steps: Orbax's renames then fail in one run with a traceback while the other hung, and the folder was left
with a half-written checkpoint and interleaved metrics. A run holds an exclusive `flock` on
`output_dir/.gptsan-train.lock` from before it writes there until it ends; the system releases it when the
process ends in any way (SIGKILL too), so a stale lock cannot outlive its run. The file holds the holder's
process id, host and start time, for the message a second run gets.

Only local output_dirs are locked (a gs:// bucket has no such lock), and in a multi-process run only
process 0 takes it (every process of a run shares its output_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from gptsan import storage

LOCK_NAME = ".gptsan-train.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str, take: bool = True):
    """Holds output_dir's lock while the block runs; yields None, or the problem when it cannot be taken (the
    caller raises it, after the processes agree). Makes output_dir when it is missing."""
    if not take or storage.is_remote(output_dir):
        yield None
        return
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(path, "a+", encoding="utf-8")  # held open for the block
    except OSError as err:
        yield f"train_params.output_dir {output_dir}: cannot write there ({err})"
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()  # empty while the holder is between taking the lock and writing it
            yield (f"train_params.output_dir {output_dir}: another training run is writing there"
                   f"{f' ({holder})' if holder else ''}; wait for it to end or stop it, or give another output_dir")
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        lock.flush()
        yield None
    finally:
        lock.close()  # releases the lock
