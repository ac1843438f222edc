"""One check shared by every loader: the names and shapes found equal the names and shapes expected."""

from __future__ import annotations

from collections.abc import Mapping

from gptsan.errors import UserError

SHOWN = 3  # offending names listed per kind in the error


def _first(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_tensors(path: str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                  what: str = "tensors") -> None:
    """Raise ONE UserError naming `path` and the first offending names: missing, extra, misshapen."""
    missing = expected.keys() - found.keys()
    extra = found.keys() - expected.keys()
    misshapen = [name for name in expected.keys() & found.keys()
                 if tuple(found[name]) != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if extra:
        problems.append(f"unexpected {_first(extra)}")
    if misshapen:
        name = sorted(misshapen)[0]
        problems.append(f"wrong shape for {_first(misshapen)} ({name}: {tuple(found[name])}, expected "
                        f"{tuple(expected[name])})")
    if problems:
        raise UserError(f"{path}: {what} do not match the model configuration: {'; '.join(problems)}")


def error_summary(err: Exception) -> str:
    """The first line of a library's error message (they can be pages long), for a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
