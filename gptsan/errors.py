"""The one user-facing error type, the wrapper that turns it into a single line and an exit code, and the
one-line warning."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (a flag, a file, a checkpoint). Printed as one line, exit status 2."""


def warn(message: str) -> None:
    """One line `warning: MESSAGE` on stderr: something the user should know that does not stop the run."""
    print(f"warning: {message}", file=sys.stderr)


def cli_main(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script entry point: a UserError, or an OSError about a named path (a folder opened as a
    file, a missing folder, no permission, a full disk), becomes `error: ...` on stderr and exit status 2.
    Ctrl-C is `interrupted` and exit status 130; a reader of stdout that went away (`| head`) ends the tool
    quietly with 141, as a SIGPIPE ends other command-line tools."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            with ctrl_c_noticed() as noticed:
                status = func(*args, **kwargs) or 0
            if noticed():  # a Ctrl-C that Python dropped (raised inside a garbage-collection callback)
                raise KeyboardInterrupt
            return status
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except IsADirectoryError as err:  # a folder given where a file belongs: a user's path, in any tool
            print(f"error: {err.filename}: is a folder; expected a file", file=sys.stderr)
            return 2
        except BrokenPipeError:
            with contextlib.suppress(OSError):  # no second error when Python flushes stdout at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except OSError as err:  # a path the system refused (no such folder, permission, read-only, disk full)
            if err.filename is None:
                raise
            print(f"error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            with contextlib.suppress(OSError):
                sys.stdout.flush()
                sys.stderr.flush()
            # At once: Python's own exit while XLA compiled in its threads crashed (SIGSEGV) after a Ctrl-C.
            # What a tool writes is written to a temp name first and removed on the way out, before here.
            os._exit(130)

    return wrapper


@contextlib.contextmanager
def ctrl_c_noticed():
    """Ctrl-C raises KeyboardInterrupt as Python's own handler does, and is also remembered: the yielded
    function says whether one came. Python drops an exception raised inside a garbage-collection callback
    (JAX has one), so a Ctrl-C while JAX is imported could be lost and the tool run on to the end."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # e.g. ignored in a background job
        yield lambda: False
        return
    came = threading.Event()

    def handle(signum, frame):
        came.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield came.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
