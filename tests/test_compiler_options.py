"""The train and eval steps' XLA options: oneDNN matmuls on x86 CPUs (gptsan/train/compiler_options.py)."""

import functools
import platform

import jax
import numpy as np
import pytest

from gptsan.model.params import init_params
from gptsan.model.transformer import GPTSAN
from gptsan.train import compiler_options as options_module
from gptsan.train.compiler_options import ONEDNN_MATMULS, step_compiler_options
from gptsan.train.optim import make_optimizer
from gptsan.train.precision import LossScale
from gptsan.train.state import create_state
from gptsan.train.step import StepOptions, loss_and_grads, make_eval_step, make_train_step
from tests.train_support import counting_corpus, memory_batches, mini_config

X86 = platform.machine().lower() in ("x86_64", "amd64")
# What a user's one-CPU-device train step compiles with: oneDNN matmuls at XLA's default optimization level
# (3), which the suite's quick compile (level 0, tests/conftest.py) lowers everywhere else.
AS_USERS_GET_IT = {**ONEDNN_MATMULS, "xla_backend_optimization_level": 3}


@pytest.fixture
def no_compilation_cache():
    """Without the suite's persistent compilation cache (tests/conftest.py), as a user's run has none."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_onednn_only_for_one_cpu_device_and_without_a_compilation_cache(monkeypatch, no_compilation_cache):
    monkeypatch.setattr(options_module, "has_avx512", lambda: True)
    assert step_compiler_options("gpu", 1) is None
    assert step_compiler_options("tpu", 1) is None
    assert step_compiler_options("cpu", 1) == (ONEDNN_MATMULS if X86 else None)
    assert step_compiler_options("cpu", 8) is None  # simulated devices share the cores
    monkeypatch.setenv("GPTSAN_ONEDNN_MATMULS", "0")
    assert step_compiler_options("cpu", 1) is None
    monkeypatch.delenv("GPTSAN_ONEDNN_MATMULS")
    jax.config.update("jax_compilation_cache_dir", "/nonexistent-cache")
    # the persistent cache cannot store oneDNN thunks: the cached steps keep XLA's defaults
    assert step_compiler_options("cpu", 1) is None


@pytest.mark.skipif(not X86, reason="oneDNN matmuls are used on x86 CPUs only")
def test_onednn_is_off_without_avx512_unless_asked_for(monkeypatch, no_compilation_cache):
    """Without AVX-512 a GPTSAN-shaped step hung in oneDNN's nested `parallel` (compiler_options docstring)."""
    monkeypatch.setattr(options_module, "has_avx512", lambda: False)
    monkeypatch.delenv("GPTSAN_ONEDNN_MATMULS", raising=False)
    assert step_compiler_options("cpu", 1) is None
    monkeypatch.setenv("GPTSAN_ONEDNN_MATMULS", "1")
    assert step_compiler_options("cpu", 1) == ONEDNN_MATMULS
    assert step_compiler_options("cpu", 8) is None


def test_avx512_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    flags = {"avx2 only": "flags\t\t: fpu sse2 avx avx2 fma\n", "avx512": "flags\t\t: fpu avx2 avx512f avx512bw\n"}
    for name, line in flags.items():
        cpuinfo = tmp_path / name
        cpuinfo.write_text("processor\t: 0\n" + line)
        monkeypatch.setattr(options_module, "CPUINFO", str(cpuinfo))
        assert options_module.has_avx512() == (name == "avx512"), name
    monkeypatch.setattr(options_module, "CPUINFO", str(tmp_path / "missing"))
    assert options_module.has_avx512() is False


@pytest.mark.skipif(not X86, reason="oneDNN matmuls are used on x86 CPUs only")
@pytest.mark.parametrize("mode,dtype", [("lm", "float32"), ("hybrid", "float32"),
                                        pytest.param("lm", "bfloat16", marks=pytest.mark.slow)])  # 50 s on 2 cores
def test_steps_compiled_as_users_get_them_match_the_suites_compile(mode, dtype, no_compilation_cache):
    """The same state and batches through steps compiled as a user's (oneDNN matmuls, optimization level 3)
    and as the rest of the suite's (XLA's matmuls, level 0): the same gradients, three train steps' losses and
    an eval loss up to rounding (the causal attention path in lm mode, the masked prefix-LM path in hybrid).
    Weights after Adam are not compared: Adam moves a weight by ~lr whatever its gradient's size, so rounding
    in a near-zero gradient shows there at full size."""
    config = mini_config(dtype=dtype)
    optimizer, schedule = make_optimizer("adam", 3e-3, 0)
    corpus = counting_corpus(32, config.num_contexts, config.num_vocabulary)
    corpus["num_input"] = np.arange(32) % config.num_contexts if mode == "hybrid" else corpus["num_input"]
    batches = [next(memory_batches(corpus, 8, seed=s)) for s in range(3)]
    options = StepOptions(mode=mode, spout="onehot")
    model = GPTSAN(config)
    results = []
    for compiler_options in (None, AS_USERS_GET_IT):
        step = jax.jit(make_train_step(config, optimizer, schedule, options), compiler_options=compiler_options)
        evaluate = jax.jit(make_eval_step(config, options), compiler_options=compiler_options)
        gradients = jax.jit(functools.partial(loss_and_grads, model, options), compiler_options=compiler_options)
        state = create_state(init_params(config, 0), frozenset(), optimizer, 0, LossScale.for_dtype(dtype))
        compiled = step.lower(state, batches[0]).compile()  # run below too: the step is compiled once
        assert ("%onednn_fusion" in compiled.as_text()) == (compiler_options is not None)
        grads = jax.tree_util.tree_leaves(gradients(state, batches[0])[0])
        losses = []
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
        losses.append(float(evaluate(state, batches[0])["loss"]))
        results.append((losses, grads))
    (suite_losses, suite_grads), (users_losses, users_grads) = results
    tolerance = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(users_losses, suite_losses, rtol=tolerance / 10)
    for ours, reference in zip(users_grads, suite_grads, strict=True):
        reference = np.asarray(reference, np.float32)
        np.testing.assert_allclose(np.asarray(ours, np.float32), reference, rtol=tolerance,
                                   atol=tolerance * np.abs(reference).max())
