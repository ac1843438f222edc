"""Two processes on loopback (jax.distributed, CPU collectives over gloo), 4 simulated devices each, train
like one process with 8 devices: same losses, and one checkpoint written jointly."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.distributed_worker import STEPS, train_losses

ROOT = Path(__file__).resolve().parents[1]
# float32 on CPU; the same program over two processes (gloo all-reduces): measured 1.0e-7 relative.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    if jax.device_count() < 8:
        pytest.fail("needs 8 devices: conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8")
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")}
    checkpoints = tmp_path / "ckpt"
    workers = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"), coordinator, "2",
                                 str(index), str(checkpoints)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        single = train_losses()  # the one-process reference, while the workers start up
        outputs = [worker.communicate(timeout=240) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    printed = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]  # not gloo's
    assert printed[1] == []  # only process 0 reports
    distributed = json.loads(printed[0][-1])["losses"]

    print("two processes", distributed, "one process", single)
    assert len(distributed) == STEPS
    np.testing.assert_allclose(distributed, single, rtol=TOLERANCE)
    # One checkpoint, written jointly (each process its shards, process 0 the metadata).
    assert sorted(path.name for path in checkpoints.iterdir()) == [str(STEPS)]
