"""cli_main: a user's mistake, or the system refusing a path the user named, is one line and exit status 2;
anything else keeps its traceback."""

import errno

import pytest

from gptsan.errors import UserError, cli_main


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
