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
    # a rename: the destination, not the tool's temporary file, is what the user gave
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out/.a.partial-1", None, "out/a"),
     "error: out/a: is a folder; expected a file"),
    (PermissionError(errno.EACCES, "Permission denied", "out/.a.partial-1", None, "out/a"),
     "error: out/a: Permission denied"),
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


DEFERRED = "from gptsan.errors import ctrl_c_deferred\nwith ctrl_c_deferred():\n"
CTRL_C_DEFERRED = {  # block (after DEFERRED), started with Ctrl-C ignored, expected (status, stdout, stderr)
    # Orbax's background writes went on after a Ctrl-C and refilled the staging folder being removed
    # (gptsan-convert left hidden `.OUT.tmp-*` folders, 8 of 16 timed runs): the first waits for the block's end.
    "first at the end": ("    signal.raise_signal(signal.SIGINT)\n    print('block ended')\nprint('not reached')",
                         False, (130, "block ended\n", "interrupted\n")),
    "second at once": ("    signal.raise_signal(signal.SIGINT)\n    print('after the first')\n"
                       "    signal.raise_signal(signal.SIGINT)\n    print('not reached')",
                       False, (130, "after the first\n", "interrupted\n")),
    "ignored stays ignored": ("    signal.raise_signal(signal.SIGINT)\nprint('went on')", True, (0, "went on\n", "")),
}


@pytest.mark.parametrize("case", CTRL_C_DEFERRED)
def test_a_ctrl_c_in_a_deferred_block(case):
    block, ignored, expected = CTRL_C_DEFERRED[case]
    done = run_entry_point(DEFERRED + block, ignoring_ctrl_c=ignored)
    assert (done.returncode, done.stdout, done.stderr) == expected


def test_a_ctrl_c_while_the_process_exits_is_one_line_and_status_130():
    """A Ctrl-C in JAX's exit hook (the tool's work done) was a KeyboardInterrupt traceback ('Exception ignored
    in atexit callback') and status 0."""
    body = ("import atexit, time\n"
            "def late():  # an exit hook registered while the tool runs, as JAX's clean-up is\n"
            "    signal.raise_signal(signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "atexit.register(late)\n"
            "print('done')")
    done = run_entry_point(body)
    assert (done.returncode, done.stdout, done.stderr) == (130, "done\n", "interrupted\n")


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


def test_ctrl_c_ignored_by_the_caller_stays_ignored():
    """A tool started in the background of a script (SIGINT ignored) must not take Ctrl-C back."""
    done = run_entry_point("signal.raise_signal(signal.SIGINT)\nprint('went on')",
                           ignoring_ctrl_c=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "went on\n", "")


def run_script(lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(lines)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


# Ctrl-C where Python drops the KeyboardInterrupt ("Exception ignored in: ..."). While JAX loads it often lands in
# JAX's own garbage-collection callback, and the tool ran on (to its end, or to an error line).
CTRL_C_DROPPED = {
    "in a gc callback": """import gc
def ctrl_c_in_gc(phase, info):
    if not sent:
        sent.append(phase)
        signal.raise_signal(signal.SIGINT)
sent = []
gc.callbacks.append(ctrl_c_in_gc)
gc.collect()
""",
    "in a __del__": """class Dropper:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        self.ran = True  # the handler raises here
Dropper()
""",
    "in a weakref callback": """import weakref
class Referent:
    pass
referent = Referent()
reference = weakref.ref(referent, lambda ref: signal.raise_signal(signal.SIGINT))
del referent
""",
}


@pytest.mark.parametrize("where", CTRL_C_DROPPED)
def test_a_ctrl_c_python_drops_still_stops_the_tool(where):
    work = "import time\nfor _ in range(200):  # 10 s\n    time.sleep(0.05)\nprint('went on')"
    done = run_entry_point(CTRL_C_DROPPED[where] + work)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


@pytest.mark.parametrize("where", CTRL_C_DROPPED)
def test_a_dropped_ctrl_c_wins_over_a_later_user_error(where):
    """The tool's next step fails at once (before the Ctrl-C is sent again): `interrupted`, not `error: ...`."""
    error = "from gptsan.errors import UserError\nraise UserError('--vocabulary v: file not found')"
    done = run_entry_point(CTRL_C_DROPPED[where] + error)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_a_ctrl_c_sent_again_never_reaches_the_handler_put_back_after_the_tool():
    """The signal of a dropped Ctrl-C is sent again a moment later: when the tool ends first, it must not reach
    the SIGINT handler in place after it (Python's: a KeyboardInterrupt traceback)."""
    lines = ["import signal, time", "from gptsan.errors import ctrl_c_interrupts", "try:",
             "    with ctrl_c_interrupts():",
             *("        " + line for line in CTRL_C_DROPPED["in a gc callback"].splitlines()),
             "except KeyboardInterrupt:", "    print('interrupted')",
             "time.sleep(0.2)  # a signal sent again after the tool would raise KeyboardInterrupt here",
             "print('handler put back:', signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    done = run_script(lines)
    assert (done.returncode, done.stdout, done.stderr) == (0, "interrupted\nhandler put back: True\n", "")


def test_a_ctrl_c_while_a_c_extension_initialises_waits_until_it_is_loaded():
    """jaxlib's C++ module initialisation aborts or crashes the process (SIGABRT, SIGSEGV; 6 of 20 Ctrl-Cs 0.6-0.8 s
    into gptsan-generate) on a KeyboardInterrupt raised in the Python code it runs. Here _decimal's, which
    imports `numbers` as it initialises: the Ctrl-C comes after it."""
    lines = ["import signal, sys, time", "from gptsan.errors import ctrl_c_interrupts",
             "class CtrlCAtNumbers:", "    def find_spec(self, name, path=None, target=None):",
             "        if name == 'numbers':", "            signal.raise_signal(signal.SIGINT)",
             "sys.meta_path.insert(0, CtrlCAtNumbers())", "try:", "    with ctrl_c_interrupts():",
             "        import decimal", "        for _ in range(200):  # 10 s", "            time.sleep(0.05)",
             "        print('went on')",
             "except KeyboardInterrupt:", "    print('interrupted; _decimal loaded:', '_decimal' in sys.modules)"]
    done = run_script(lines)
    assert (done.returncode, done.stdout, done.stderr) == (0, "interrupted; _decimal loaded: True\n", "")


def test_a_hook_for_dropped_errors_installed_by_the_tool_outlives_the_tool():
    """A failed Orbax restore leaves reads in flight whose late 'Event loop is closed' errors a hook installed
    while the tool runs drops (gptsan/checkpoint/native.py). They come after the error line, when the tool is
    over: the hook put back at its end was Python's, and 1 of 2 suite runs printed 24 lines of tracebacks after
    gptsan-logits' error line. The hook stays; the tool's own Ctrl-C hook passes such errors on."""
    lines = ["import sys, weakref", "from gptsan.errors import ctrl_c_interrupts", "seen = []",
             "def call_soon_threadsafe(ref):  # asyncio's, on a closed loop, called by a late read",
             "    raise RuntimeError('Event loop is closed')",
             "def dropping(unraisable):",
             "    seen.append(str(unraisable.exc_value))",
             "with ctrl_c_interrupts():", "    sys.unraisablehook = dropping",
             "class Read:", "    pass",
             "read = Read()", "late = weakref.ref(read, call_soon_threadsafe)", "del read",
             "print(seen, sys.unraisablehook is dropping)"]
    done = run_script(lines)
    assert (done.returncode, done.stdout, done.stderr) == (0, "['Event loop is closed'] True\n", "")


def test_an_error_that_abandons_background_work_exits_without_waiting_for_it():
    """A failed gs:// checkpoint save leaves TensorStore writes retrying in Orbax's save thread (not a daemon):
    Python's exit waited minutes for them after the error line. The tool exits after the line."""
    body = "\n".join(["import threading, time", "from gptsan.errors import AbandonsBackgroundWork",
                      "threading.Thread(target=time.sleep, args=(600,)).start()  # a save's retries",
                      "raise AbandonsBackgroundWork('gs://b/run: saving the step-2 checkpoint failed')"])
    done = run_entry_point(body)  # a timeout (60 s) if it waited
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", "error: gs://b/run: saving the step-2 checkpoint failed\n")
