"""The command lines that load JAX (generate, languagemodel, logits, convert, export, train) reach cli_main
before it loads (seconds of imports), so a Ctrl-C while it loads is the one line `interrupted` with exit status
130, not a Python traceback, nor lost in JAX's garbage-collection callback."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "tensorflow")
# Each tool as `python -m MODULE` or `python SCRIPT` starts it, and flags that would get it past argparse.
TOOLS = {
    "gptsan.generate.cli": ["--model", "m", "--vocabulary", "v", "--context", "c"],
    "gptsan.generate.languagemodel": ["--model", "m", "--vocabulary", "v", "--context", "[MASK]"],
    "gptsan.logits_cli": ["--model", "m", "--ids", "ids.npy", "--output", "out.npy"],
    "run_generate.py": ["--model", "m", "--vocabulary", "v", "--context", "c"],
    "gptsan.convert.cli": ["--checkpoint", "c", "--output", "o"],
    "gptsan.convert.export": ["--model", "m", "--format", "hf", "--output", "o"],
    "gptsan.train.cli": ["--input_files", "x", "--parameter_file", "p.json"],
    "run_modelconvert.py": ["--checkpoint", "c", "--output", "o"],
    "run_training.py": ["--input_files", "x", "--parameter_file", "p.json"],
}
# A Ctrl-C at a fixed point: the first `import jax` sends this process a SIGINT (with Python's own SIGINT
# handler in place, as in a terminal), either right there, so the KeyboardInterrupt rises from inside that
# import, or from inside a garbage-collection callback run there (as JAX's own callback, run at any allocation
# once JAX is partly loaded, often is), where Python drops an exception: the tool went on, to `error: ...`.
CTRL_C_AT_JAX = """
import gc, os, runpy, signal, sys

def ctrl_c(*gc_callback_args):
    os.kill(os.getpid(), signal.SIGINT)

class CtrlCAtJax:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" and where == "in the import":
            ctrl_c()
        elif name == "jax" and where == "in a gc callback":
            gc.callbacks.append(ctrl_c)
            gc.collect()
            gc.callbacks.remove(ctrl_c)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.meta_path.insert(0, CtrlCAtJax())
where, tool, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
if tool.endswith(".py"):
    runpy.run_path(tool, run_name="__main__")
else:
    runpy.run_module(tool, run_name="__main__", alter_sys=True)
"""


def run_python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def import_code(tool: str) -> str:
    if tool.endswith(".py"):
        return f"import runpy; runpy.run_path({tool!r}, run_name='imported')"
    return f"import {tool}"


@pytest.mark.parametrize("tool", TOOLS)
def test_importing_the_tool_loads_no_jax_flax_or_tensorflow(tool):
    code = import_code(tool) + f"; import sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module, flags", [
    ("gptsan.train.cli", ["--input_files", "x", "--parameter_file", "p"]),
    ("gptsan.convert.cli", ["--checkpoint", "a", "--output", "b", "--dtype", "bfloat16"]),
    ("gptsan.convert.export", ["--model", "a", "--format", "hf", "--output", "b", "--dtype", "float16"]),
])
def test_the_flags_are_read_without_loading_jax(module, flags):
    """A parser (a --help, a flag error) took 2.3-2.8 s on a 2-vCPU host when it loaded JAX for the choices of
    a flag: gptsan-train's --optimizer and --spout_vector, gptsan-convert's and gptsan-export's --dtype."""
    code = (f"import sys; from {module} import build_parser; build_parser().parse_args({flags!r}); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("where", ["in the import", "in a gc callback"])
@pytest.mark.parametrize("tool", TOOLS)
def test_ctrl_c_while_jax_loads_prints_interrupted(tool, where, tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int32))  # gptsan-logits reads it before loading JAX
    script_or_module = str(ROOT / tool) if tool.endswith(".py") else tool
    result = run_python(CTRL_C_AT_JAX, where, script_or_module, *TOOLS[tool], cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", "")
