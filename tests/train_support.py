"""Helpers for the training tests: small corpora written as GPTSAN tfrecords, and parameter files."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
from pathlib import Path

import numpy as np

FIXTURE_PARAMETERS = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "gptsan_tiny"


def one_device_xla_flags() -> str:
    """The suite's XLA_FLAGS (tests/conftest.py) without its 8 simulated devices: for the commands a test runs as
    a user's CPU run does, on one device, where the mesh is not what it tests. (One device would also mean oneDNN
    matmuls on an AVX-512 CPU, but the suite's compilation cache keeps XLA's: gptsan/train/compiler_options.py;
    tests/test_compiler_options.py compares the two.)"""
    return re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()


def counting_corpus(count: int, length: int, vocab: int, seed: int = 0, period: int = 32) -> dict:
    """Records whose next token is (token + 1) mod period: learnable from the input alone."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, period, count)
    x = (start[:, None] + np.arange(length)[None]) % period
    y = np.concatenate([x[:, 1:], np.full((count, 1), -1)], axis=1)
    return {"x": x, "y": y, "i": np.arange(count), "num_input": np.zeros(count, np.int64)}


def class_corpus(count: int, length: int, num_classes: int, seed: int = 0) -> dict:
    """Records whose targets are one token that depends only on the class id `i` (inputs are noise that
    carries no information about it): only a path from `i` into the model can predict them."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, num_classes, count)
    x = rng.integers(0, 64, (count, length))
    y = np.broadcast_to((100 + i)[:, None], (count, length)).copy()
    return {"x": x, "y": y, "i": i, "num_input": np.zeros(count, np.int64)}


def write_records(path: Path, corpus: dict) -> Path:
    from gptsan.data.schema import frame, serialize_example

    with open(path, "wb") as f:
        for n in range(len(corpus["x"])):
            f.write(frame(serialize_example({name: np.ravel(corpus[name][n]) for name in corpus})))
    return path


def memory_batches(corpus: dict, batch_size: int, seed: int = 0):
    """Endless int32 batches of an in-memory corpus, reshuffled each epoch (for step-level tests)."""
    corpus = {name: np.asarray(value, np.int32) for name, value in corpus.items()}
    count = len(corpus["x"])
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {name: value[rows] for name, value in corpus.items()}


def write_parameters(folder: Path, output_dir: str, base: Path, **train_params) -> Path:
    """A parameters.json in `folder`: the fixture's model_params and train_params with overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = json.loads((base / "parameters.json").read_text())
    parameters["train_params"].update(output_dir=str(output_dir), **train_params)
    path = folder / "parameters.json"
    path.write_text(json.dumps(parameters))
    return path


# A model small enough to compile in seconds: 1 Switch layer + 1 extended layer.
MINI_MODEL_PARAMS = {"num_contexts": 16, "num_switch_layers": 1, "num_ext_layers": 1, "num_hidden": 32,
                     "num_header": 2, "num_experts": 2, "num_pallarelizm": 1, "num_spout": 8,
                     "num_vocabulary": 128, "train_mode": "lm"}
MINI_TRAIN_PARAMS = {"batch_size": 8, "base_lr": 3e-3, "num_warmup_steps": 10, "max_to_keep_save": 3,
                     "checkpoint_per_hours": 1, "checkpoint_per_steps": 1000}


def mini_config(**runtime):
    from gptsan.model.config import ModelConfig

    return ModelConfig.from_model_params(MINI_MODEL_PARAMS, "mini", **runtime)


def write_mini_parameters(folder: Path, output_dir, **train_params) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    parameters = {"train_params": {**MINI_TRAIN_PARAMS, "output_dir": str(output_dir), **train_params},
                  "model_params": dict(MINI_MODEL_PARAMS)}
    path = folder / "parameters.json"
    path.write_text(json.dumps(parameters))
    return path


def sharded_training(config, mesh, spout: str = "none", frozen: frozenset[str] = frozenset()):
    """(step-0 state, jitted train step, batch shardings) of `config` laid out on `mesh` as the training loop
    lays them out (Adam at lr 3e-3, state donated, mesh axes in context for expert parallelism), with the
    `frozen` parameters left out of training."""
    import functools

    import jax

    from gptsan.data.schema import FEATURES
    from gptsan.model.params import abstract_params, init_params
    from gptsan.model.sharding import batch_sharding, under_mesh
    from gptsan.train.loop import state_shardings
    from gptsan.train.optim import make_optimizer
    from gptsan.train.precision import LossScale
    from gptsan.train.state import create_state
    from gptsan.train.step import StepOptions, make_train_step

    optimizer, schedule = make_optimizer("adam", 3e-3, 0)
    init = functools.partial(create_state, frozen_names=frozen, optimizer=optimizer, seed=0,
                             loss_scale=LossScale.for_dtype("float32"))
    shardings = state_shardings(jax.eval_shape(init, abstract_params(config)), config, mesh, optimizer, frozen)
    state = jax.jit(lambda: init(init_params(config, 0)), out_shardings=shardings)()
    batch_shard = {name: batch_sharding(mesh) for name in FEATURES}
    step = jax.jit(under_mesh(make_train_step(config, optimizer, schedule, StepOptions(spout=spout)), mesh),
                   in_shardings=(shardings, batch_shard), out_shardings=(shardings, None), donate_argnums=0)
    return state, step, batch_shard


def logged_steps(output_dir: Path) -> list[int]:
    """The steps of a run's metrics.jsonl rows so far (none before the file exists)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, processes: list, what: str, timeout: float = 240) -> None:
    """Poll `condition` until it holds; fail with a process's stderr if one exits first, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


@contextlib.contextmanager
def killed_at_exit(processes: list):
    """Kill and reap the processes when the block ends, however it ends."""
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()
