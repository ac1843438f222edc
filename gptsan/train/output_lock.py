"""One training run at a time in an output_dir.

Two runs writing the same output_dir (the same command started twice, say) both save checkpoints of the same
steps: Orbax's renames then fail in one run with a traceback while the other hung, and the folder was left
with a half-written checkpoint and interleaved metrics. A run holds an exclusive `flock` on
`output_dir/.gptsan-train.lock` from before it writes there until it ends; the system releases it when the
process ends in any way (SIGKILL too), so a stale lock cannot outlive its run. The file holds the holder's
process id, host and start time, for the message a second run gets.

A gs:// output_dir has no such lock (GCS has none that ends with the process holding it), so there the lock
file is a lease: its holder rewrites it every RENEW_SECONDS, and a run that finds one watches it for up to
STALE_SECONDS. Rewritten (its holder is alive): refused. Removed (its run ended): taken. Unchanged (its run was
killed, or its VM lost, before it could remove it): taken, with a warning. Two runs started within a second of
each other may both take it (GCS's create-if-absent precondition would close that gap, but the emulator the tests
run against ignores preconditions); the lease is for the common case, a run started while another runs.

In a multi-process run only process 0 takes the lock (every process of a run shares its output_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
import uuid

from gptsan import storage
from gptsan.errors import warn

LOCK_NAME = ".gptsan-train.lock"
RENEW_SECONDS = 15.0  # a gs:// lock's holder rewrites it this often
STALE_SECONDS = 50.0  # a gs:// lock not rewritten for this long was left by a run that is gone


@contextlib.contextmanager
def output_dir_lock(output_dir: str, take: bool = True):
    """Holds output_dir's lock while the block runs; yields None, or the problem when it cannot be taken (the
    caller raises it, after the processes agree). Makes output_dir when it is missing."""
    if not take:
        yield None
        return
    if storage.is_remote(output_dir):
        with remote_lease(output_dir) as problem:
            yield problem
        return
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(path, "a+", encoding="utf-8")  # held open for the block
    except OSError as err:
        yield cannot_write(output_dir, err)
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()  # empty while the holder is between taking the lock and writing it
            yield busy(output_dir, holder)
            return
        lock.seek(0)
        lock.truncate()
        lock.write(holder_line() + "\n")
        lock.flush()
        yield None
    finally:
        lock.close()  # releases the lock


def holder_line() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def busy(output_dir: str, holder: str) -> str:
    return (f"train_params.output_dir {output_dir}: another training run is writing there"
            f"{f' ({holder})' if holder else ''}; wait for it to end or stop it, or give another output_dir")


def cannot_write(output_dir: str, why: object) -> str:
    return f"train_params.output_dir {output_dir}: cannot write there ({why})"


def holder_of(text: str) -> str:
    """The holder a lock file's text names (its first line)."""
    return text.splitlines()[0] if text.strip() else ""


def read_lease(path: str) -> str | None:
    """The lock file's text, or None when there is none."""
    try:
        return storage.read_text(path)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def remote_lease(output_dir: str):
    """output_dir_lock for a gs:// output_dir (the module's doc): yields None while this run holds the lease, or
    the problem (another run holds it, output_dir cannot be written)."""
    lease = Lease(storage.join(output_dir, LOCK_NAME))
    try:
        problem = lease.take(output_dir)
    except OSError as err:
        problem = cannot_write(output_dir, storage.first_line(err))
    except BaseException:  # a Ctrl-C: a lock written already is not left for the next run to wait out
        lease.release()
        raise
    if problem:
        yield problem
        return
    lease.start()
    try:
        yield None
    finally:
        lease.release()


def watched(path: str, found: str) -> str | None:
    """The lock file's text once it differs from `found` (None: removed), or `found` after STALE_SECONDS."""
    deadline = time.monotonic() + STALE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(min(RENEW_SECONDS / 5, max(deadline - time.monotonic(), 0)))
        now = read_lease(path)
        if now != found:
            return now
    return found


class Lease:
    """This run's gs:// lock file, rewritten every RENEW_SECONDS by a daemon thread until released."""

    def __init__(self, path: str):
        self.path = path
        self.holder = holder_line()
        self.token = uuid.uuid4().hex
        self.renewals = 0
        self.text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="gptsan-lease", daemon=True)

    def take(self, output_dir: str) -> str | None:
        """Write the lock file unless another run holds it: None, or the problem."""
        found = read_lease(self.path)
        if found is not None:
            holder = holder_of(found)
            print(f"train_params.output_dir {output_dir}: another training run's lock is there ({holder}); "
                  f"watching it for up to {STALE_SECONDS:.0f} s to see whether that run is still writing",
                  file=sys.stderr, flush=True)
            now = watched(self.path, found)
            if now is not None and now != found:
                return busy(output_dir, holder_of(now))
            if now is not None:
                warn(f"train_params.output_dir {output_dir}: the lock of a run that is gone ({holder}) was not "
                     f"renewed for {STALE_SECONDS:.0f} s; taking it over")
        self.write()
        time.sleep(1.0)  # two runs that both found no lock both wrote one: the later write is the one kept
        now = read_lease(self.path)
        return None if now == self.text else busy(output_dir, holder_of(now or ""))

    def write(self) -> None:
        self.text = f"{self.holder}\nlease {self.token}, renewal {self.renewals}\n"
        storage.write_text_atomic(self.path, self.text)

    def start(self) -> None:
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            self.renewals += 1
            with contextlib.suppress(OSError):  # a blip: the next renewal comes well within STALE_SECONDS
                self.write()

    def release(self) -> None:
        """Stop renewing and remove the lock file (left to go stale when it cannot be removed: the bucket gone,
        the server out of reach)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)  # a renewal being written (a write takes well under a second)
        with contextlib.suppress(OSError):
            if read_lease(self.path) == self.text:
                fs, p = storage.filesystem(self.path)
                fs.rm_file(p)
