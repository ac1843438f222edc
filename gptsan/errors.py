"""The one user-facing error type, the wrapper that turns it into a single line and an exit code, and the
one-line warning."""

from __future__ import annotations

import _thread
import atexit
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from importlib.machinery import ExtensionFileLoader


class UserError(Exception):
    """A mistake in the user's input (a flag, a file, a checkpoint). Printed as one line, exit status 2."""


class AbandonsBackgroundWork(UserError):
    """A UserError that leaves work running in background threads nobody will wait for: a checkpoint save that
    failed (a gs:// bucket deleted mid-run) still has TensorStore writes retrying in Orbax's save thread, which
    Python's exit waited for (4-14 min after the error line). The tool exits right after the line instead."""


def refused_path(err: OSError) -> str | None:
    """The path an OSError is about: for a rename, its destination (the source is the tool's own temporary
    file, which the message named before: `out/.x.partial-3db1: is a folder` for an output name a folder held)."""
    return err.filename2 if err.filename2 is not None else err.filename


def path_error(err: OSError) -> str:
    """The line for an OSError about a named path (one the system refused): `PATH: what went wrong`."""
    return f"{refused_path(err)}: {err.strerror or err}"


def warn(message: str) -> None:
    """One line `warning: MESSAGE` on stderr: something the user should know that does not stop the run."""
    print(f"warning: {message}", file=sys.stderr)


@functools.cache
def warn_once(message: str) -> None:
    """`warn(MESSAGE)`, the first time this process meets MESSAGE."""
    warn(message)


def cli_main(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script entry point: a UserError, or an OSError about a named path (a folder opened as a
    file, a missing folder, no permission, a full disk), becomes `error: ...` on stderr and exit status 2.
    Ctrl-C is `interrupted` and exit status 130; a reader of stdout that went away (`| head`) ends the tool
    quietly with 141, as a SIGPIPE ends other command-line tools."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            with ctrl_c_interrupts():
                return func(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            if isinstance(err, AbandonsBackgroundWork):
                exit_now(2)
            return 2
        except IsADirectoryError as err:  # a folder given where a file belongs: a user's path, in any tool
            print(f"error: {refused_path(err)}: is a folder; expected a file", file=sys.stderr)
            return 2
        except BrokenPipeError:
            with contextlib.suppress(OSError):  # no second error when Python flushes stdout at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except OSError as err:  # a path the system refused (no such folder, permission, read-only, disk full)
            if err.filename is None:
                raise
            print(f"error: {path_error(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            # At once: Python's own exit while XLA compiled in its threads crashed (SIGSEGV) after a Ctrl-C.
            exit_now(130)
        finally:
            atexit.unregister(_ctrl_c_ends_the_exit)  # registered last, it runs first: before JAX's clean-up
            atexit.register(_ctrl_c_ends_the_exit)

    return wrapper


def _ctrl_c_ends_the_exit() -> None:
    """At the process's exit, after the tool's work: a Ctrl-C while JAX and Orbax clean up is `interrupted` and
    130 at once; it was a KeyboardInterrupt traceback from JAX's exit hook ('Exception ignored in atexit
    callback') and status 0. (Later in Python's shutdown, where handlers are gone, a Ctrl-C ends the process by
    the signal, as it ends most tools: status 130 to the shell, no line.)"""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (background job)
        signal.signal(signal.SIGINT, _interrupted_while_exiting)


def _interrupted_while_exiting(signum, frame) -> None:
    with contextlib.suppress(OSError):
        print("interrupted", file=sys.stderr)
    exit_now(130)


def exit_now(status: int) -> None:
    """End the process with `status` without waiting for its other threads (nor running atexit hooks). What a
    tool writes is written to a temp name first and removed on the way out, before here."""
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt as Python's own handler does, made sure to stop the tool. While JAX loads
    a Ctrl-C often lands where Python drops the exception (JAX's garbage-collection callback; also a __del__ or a
    weakref callback: sys.unraisablehook gets it) and the tool ran on, or in a C extension's initialisation,
    where it is not raised (see `inside_extension_init`): in both cases the signal is sent again 10 ms later,
    from a thread (sent from this thread, it would come back at once, still in there). And a Ctrl-C that came
    wins however the tool ends (normally, or with a UserError)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # e.g. ignored in a background job
        yield
        return
    came = over = False
    sending_again = _thread.allocate_lock()

    def handle(signum, frame):
        nonlocal came
        came = True
        if over:  # while the previous handler is put back: the KeyboardInterrupt is raised below
            return
        if inside_extension_init(frame):
            send_again_soon()
            return
        raise KeyboardInterrupt

    def send_again_if_dropped(unraisable):  # sys.unraisablehook: an exception Python drops
        if not over and issubclass(unraisable.exc_type, KeyboardInterrupt):
            send_again_soon()
        else:
            previous_hook(unraisable)

    def send_again_soon():
        _thread.start_new_thread(send_again, ())  # not threading's: its locks may be held here

    def send_again():
        time.sleep(0.01)
        with sending_again:
            if not over:
                _thread.interrupt_main(signal.SIGINT)

    previous, previous_hook = signal.signal(signal.SIGINT, handle), sys.unraisablehook
    sys.unraisablehook = send_again_if_dropped
    try:
        yield
    finally:
        over = True
        with sending_again:  # one under way has sent the signal (taken by `handle` at once) or will not
            pass
        # A hook installed on top of this one while the tool ran (one that drops the late reads of an Orbax
        # restore that failed: gptsan/checkpoint/native.py) stays, as it is needed after the error line is
        # printed too; this one then passes everything on.
        if sys.unraisablehook is send_again_if_dropped:
            sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)
        if came:
            raise KeyboardInterrupt  # over any other ending


@contextlib.contextmanager
def ctrl_c_deferred():
    """A first Ctrl-C in the block takes effect at its end; a second one at once. For writes that go on in
    background threads once the main thread is interrupted (Orbax's): the folder being written is removed
    after the Ctrl-C, and they wrote parts of it again afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # another thread's block, or Ctrl-C ignored (or left to the system) here
        return
    came = False

    def handle(signum, frame):
        nonlocal came
        if came:  # a second Ctrl-C: at once, as the handler before this one takes it
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
        came = True

    signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        previous(signal.SIGINT, None)


# A C extension's module initialisation. jaxlib's (C++, nanobind) aborts or crashes the process on an exception
# raised in the Python code it runs (enum set-up, imports), such as a KeyboardInterrupt.
EXTENSION_INIT = (ExtensionFileLoader.create_module.__code__, ExtensionFileLoader.exec_module.__code__)


def inside_extension_init(frame) -> bool:
    """Whether `frame` (a signal handler's) runs inside a C extension's module initialisation, or in what it
    called."""
    while frame is not None:
        if frame.f_code in EXTENSION_INIT:
            return True
        frame = frame.f_back
    return False
