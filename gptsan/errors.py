"""The one user-facing error type, the wrapper that turns it into a single line and an exit code, and the
one-line warning."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (a flag, a file, a checkpoint). Printed as one line, exit status 2."""


def warn(message: str) -> None:
    """One line `warning: MESSAGE` on stderr: something the user should know that does not stop the run."""
    print(f"warning: {message}", file=sys.stderr)


def cli_main(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script entry point: a UserError, or an OSError about a named path (a folder opened as a
    file, a missing folder, no permission, a full disk), becomes `error: ...` on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except IsADirectoryError as err:  # a folder given where a file belongs: a user's path, in any tool
            print(f"error: {err.filename}: is a folder; expected a file", file=sys.stderr)
            return 2
        except OSError as err:  # a path the system refused (no such folder, permission, read-only, disk full)
            if err.filename is None:
                raise
            print(f"error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
