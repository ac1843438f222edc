"""What every loader shares: the check that the names and shapes found equal the names and shapes expected,
that weights are floating point, and the one-line summary of a library's error about an unreadable file."""

from __future__ import annotations

import re
from collections.abc import Mapping

from gptsan import storage
from gptsan.errors import UserError

SHOWN = 3  # offending names listed per kind in the error


def _first(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def refuse_not_floating(file: str, bad: Mapping[str, str], accepted: tuple[str, ...]) -> None:
    """Weights are floating point: integer or boolean tensors (`bad`: name -> dtype; cast silently before) are
    refused, `accepted` being the format's floating dtypes."""
    if bad:
        first = min(bad)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{file}: {first}{more} is {bad[first]}; expected floating-point weights "
                        f"({', '.join(accepted)})")


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
    """One line for a UserError out of a library's error message (they can be pages long). A TensorStore error
    (what Orbax raises for a truncated, missing or corrupt file of a checkpoint) says in plain words which
    parameter or file is unreadable and why, without Orbax's wrapper or TensorStore's spec."""
    chain = storage.causes(err)
    status = next((e for e in chain if TENSORSTORE_STATUS.match(str(e))), None)
    if status is not None:
        return _plain_tensorstore_error(str(status))
    # Orbax wraps a failed read in a message that ends with the TensorStore's repr: never shown.
    shown = next((e for e in chain if "TensorStore" not in str(e)), None)
    text = str(shown).strip() if shown is not None else ""
    return text.splitlines()[0][:300] if text else type(shown or err).__name__


# TensorStore's messages start with an absl status code: `OUT_OF_RANGE: Error reading ...`.
TENSORSTORE_STATUS = re.compile(r"(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                                r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                                r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")
TENSORSTORE_KEY = re.compile(r'Error reading "([^"]+)" in OCDBT database')  # `model.att0.o.kernel/0.0.0`
TENSORSTORE_FILE = re.compile(r'of local file "([^"]+)"')
SHORT_READ = re.compile(r"Requested byte range \[\d+, (\d+)\) is not valid for value of size (\d+)")


def _plain_tensorstore_error(text: str) -> str:
    """TensorStore's status message in plain words: `OUT_OF_RANGE: Error reading "model.wte/0.0" in OCDBT
    database at local file "...": Requested byte range [0, 9) is not valid for value of size 4 [tensorstore_spec=
    '{...}']` is `the stored data of model/wte ends early: a file of the checkpoint is truncated or missing`."""
    text = storage.without_tensorstore_details(text)
    file = TENSORSTORE_FILE.search(text)
    short = SHORT_READ.search(text)
    if file is not None and short is not None:  # a file of the database's index, named
        return f"file {file.group(1)} is cut short: {short.group(2)} bytes, at least {short.group(1)} expected"
    if file is not None and text.startswith("NOT_FOUND"):
        return f"file {file.group(1)} is missing"
    key = TENSORSTORE_KEY.search(text)
    if key is None:
        return TENSORSTORE_STATUS.sub("", text, count=1).splitlines()[0][:300]
    name = key.group(1).rsplit("/", 1)[0].replace(".", "/")  # Orbax joins the tree's keys with "."
    reason = text[key.end():].split('": ', 1)[-1].split(";")[0]  # after the database's path; no `; at byte 0`
    if short is not None or reason.startswith("Truncated"):  # a deleted data file reads as a truncated one
        return f"the stored data of {name} ends early: a file of the checkpoint is truncated or missing"
    if "decompress" in reason:  # `ZSTD_decompressStream() failed: Data corruption detected`
        return f"the stored data of {name} is corrupt (it does not decompress)"
    return f"cannot read the stored data of {name}: {reason}"[:300]
