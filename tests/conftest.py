"""Test set-up before JAX loads: 8 simulated CPU devices and a quick compile; the shared fixtures' location.

The suite's models are tiny, so its time is mostly XLA compiling them: at LLVM's -O0 for the CPU backend
(`--xla_backend_optimization_level=0`; XLA's default is 3) it took 7 min 49 s on 2 cores against 12 min 44 s,
and every test passed both ways. The subprocesses the tests start inherit both flags. The code a user runs is
still compiled and checked at level 3: tests/test_compiler_options.py compares the steps compiled both ways.
"""

import os
import shutil
import signal
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole run, every program in it however quick to compile: the tests and
# the commands they start compile the same small programs again and again (a run and its restart, the mini model in
# every training test). Made by the process that starts the run (xdist's controller, or the only one) and removed
# when it ends; its workers and their subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SUITE_CACHE = tempfile.mkdtemp(prefix="gptsan-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The tests send Ctrl-C to the tools they start as a terminal would, and expect them to take it: a suite started
# with SIGINT ignored (`pytest &` in a script: the shell ignores it for background jobs) would pass that on to every
# process it starts, and the tools, rightly, keep ignoring it. The suite's processes take it as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

SHARED = Path(os.environ.get("GPTSAN_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    """A path under shared/, or skip the test with the reason when shared/ is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixtures not found at {path} (set GPTSAN_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_tf_dir() -> Path:
    return shared_path("fixtures", "gptsan_tiny", "gptsan_tf")


@pytest.fixture(scope="session")
def tiny_hf_dir() -> Path:
    return shared_path("fixtures", "gptsan_tiny", "hf")


@pytest.fixture(scope="session")
def tiny_cases():
    import numpy as np

    return dict(np.load(shared_path("fixtures", "gptsan_tiny", "cases.npz")))


@pytest.fixture(scope="session")
def tiny_names():
    import numpy as np

    return dict(np.load(shared_path("fixtures", "gptsan_tiny", "gptsan_names.npz")))


@pytest.fixture(scope="session")
def tiny(tiny_tf_dir, tiny_names):
    """(ModelConfig, parameter tree) of the reference fixture model."""
    import jax.numpy as jnp

    from gptsan.model import load_config, unflatten

    config = load_config(tiny_tf_dir / "parameters.json")
    return config, unflatten({name: jnp.asarray(value) for name, value in tiny_names.items()})


def pytest_unconfigure(config):
    if "_SUITE_CACHE" in globals():
        shutil.rmtree(_SUITE_CACHE, ignore_errors=True)


# The files that take longest, started first: xdist hands out whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder; its default order, most tests first, started the 150 s demo test last, alone on one
# core for its last two minutes). Seconds on a 2-vCPU Zen 1, two workers: 434, 280, 153, 150, 110, 108.
LONGEST_FIRST = ("test_train_resume.py", "test_distributed.py", "test_demo.py", "test_train_step.py",
                 "test_compiler_options.py", "test_generate_cli.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is pytest's
