"""cli_main: a user's mistake, or the system refusing a path the user named, is one line and exit status 2;
anything else keeps its traceback. Ctrl-C is one line and 130, a closed stdout a quiet 141."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.errors import UserError, cli_main

ROOT = Path(__file__).resolve().parents[1]


def entry_point_raising(error):
    @cli_main
    def main():
        raise error
    return main


@pytest.mark.parametrize("error, line", [
    (UserError("--flag: expected a number"), "error: --flag: expected a number"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/run"), "error: /data/run: is a folder; expected a file"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/x.tmp-1"),
     "error: /proc/x.tmp-1: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/out.jsonl"),
     "error: /root/out.jsonl: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/tmp/out.npy"), "error: /tmp/out.npy: No space left on device"),
])
def test_user_facing_errors_are_one_line_and_status_2(error, line, capsys):
    assert entry_point_raising(error)() == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


@pytest.mark.parametrize("error", [OSError("socket closed"), ValueError("a bug"), KeyError("x")])
def test_other_errors_keep_their_traceback(error):
    with pytest.raises(type(error)):
        entry_point_raising(error)()


def entry_point_script(body: str) -> list[str]:
    """A fresh Python (the entry point may end the process) running `body` as a cli_main entry point."""
    script = "\n".join(["import os, signal, sys", "from gptsan.errors import cli_main", "@cli_main",
                        "def main():", *("    " + line for line in body.splitlines()), "sys.exit(main())"])
    return [sys.executable, "-c", script]


def run_entry_point(body: str, ignoring_ctrl_c: bool = False) -> subprocess.CompletedProcess:
    """`ignoring_ctrl_c`: started as a shell starts a background job, SIGINT ignored (by the shell's `trap`, not
    a preexec_fn: a fork of this multithreaded JAX process)."""
    command = entry_point_script(body)
    if ignoring_ctrl_c:
        command = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *command]
    return subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)


def test_a_reader_of_stdout_that_stops_early_ends_the_tool_quietly():
    """`gptsan-generate ... | head -1` used to end in a BrokenPipeError traceback."""
    writer = subprocess.Popen(entry_point_script("for i in range(10**6):\n    print(i)"),
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "0\n"
    writer.stdout.close()  # as `head -1` does
    assert writer.wait(timeout=60) == 128 + signal.SIGPIPE
    assert writer.stderr.read() == ""


def test_ctrl_c_is_one_line_and_status_130():
    done = run_entry_point("signal.raise_signal(signal.SIGINT)\nprint('not reached')")
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_a_ctrl_c_python_drops_still_ends_the_tool_with_130():
    """Python drops an exception raised in a garbage-collection callback (JAX has one) or a __del__: a Ctrl-C
    there was lost, and the tool ran on to the end and exited 0."""
    body = ("class Dropper:\n    def __del__(self):\n        signal.raise_signal(signal.SIGINT)\n"
            "        self.ran = True  # the handler raises here, and Python drops it\n"
            "Dropper()\nprint('the work went on')")
    done = run_entry_point(body)
    assert done.returncode == 130 and done.stdout == "the work went on\n"
    assert done.stderr.startswith("Exception ignored in: <function main.<locals>.Dropper.__del__")  # Python's
    assert done.stderr.splitlines()[-1] == "interrupted"


def test_ctrl_c_ignored_by_the_caller_stays_ignored():
    """A tool started in the background of a script (SIGINT ignored) must not take Ctrl-C back."""
    done = run_entry_point("signal.raise_signal(signal.SIGINT)\nprint('went on')",
                           ignoring_ctrl_c=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "went on\n", "")
