"""Test set-up before JAX loads: 8 simulated CPU devices and a quick compile; the shared fixtures' location.

The suite's models are tiny, so its time is mostly XLA compiling them: at LLVM's -O0 for the CPU backend
(`--xla_backend_optimization_level=0`; XLA's default is 3) it took 7 min 49 s on 2 cores against 12 min 44 s,
and every test passed both ways. The subprocesses the tests start inherit both flags. The code a user runs is
still compiled and checked at level 3: tests/test_compiler_options.py compares the steps compiled both ways.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
