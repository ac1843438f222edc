"""Two processes on loopback (jax.distributed, CPU collectives over gloo), 4 simulated devices each, train
like one process with 8 devices: same losses, and one checkpoint written jointly."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.train.config import RunConfig
from gptsan.train.loop import run
from tests.distributed_worker import STEPS, train_losses
from tests.train_support import (
    counting_corpus,
    killed_at_exit,
    logged_steps,
    wait_for,
    write_mini_parameters,
    write_records,
)

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


def start_training(tmp_path: Path, *flags: str, **train_params) -> tuple[list[subprocess.Popen], Path]:
    """run_training.py as two processes (one CPU device each) on the mini model; (the workers, output_dir)."""
    write_records(tmp_path / "train-0.tfrecord", counting_corpus(40, 16, 128, seed=0, period=8))
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, **train_params)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")}
    coordinator = f"127.0.0.1:{free_port()}"
    workers = [subprocess.Popen([sys.executable, str(ROOT / "run_training.py"), "--input_files",
                                 str(tmp_path / "train-*.tfrecord"), "--parameter_file", str(parameter_file),
                                 "--coordinator_address", coordinator, "--num_processes", "2", "--process_id",
                                 str(index), "--log_every", "1", "--no_progress", *flags],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
    return workers, out


@pytest.mark.parametrize("signum, receiver", [(signal.SIGTERM, 1), (signal.SIGINT, 0)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_all_after_the_same_step_with_one_checkpoint(tmp_path, signum, receiver):
    """A preemption notice (SIGTERM) or a Ctrl-C reaches one of two processes. Both stop after the same step,
    save it jointly and exit 0. The signalled process used to leave the loop alone and the other's next
    collective failed ('Gloo AllGather failed'), with no checkpoint."""
    workers, out = start_training(tmp_path, checkpoint_per_steps=1000)
    with killed_at_exit(workers):
        wait_for(lambda: len(logged_steps(out)) >= 3, workers, "3 steps")
        with pytest.raises(UserError, match=r"another training run is writing there \(process \d+ on "):
            run(RunConfig(parameter_file=str(out.parent / "model" / "parameters.json"), progress=False,
                          input_files=str(tmp_path / "train-*.tfrecord")))  # process 0 holds output_dir
        workers[receiver].send_signal(signum)
        errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for err in errors]
    logged = logged_steps(out)
    assert sorted(path.name for path in out.iterdir() if path.name.isdigit()) == [str(max(logged))]
    assert logged == list(range(1, max(logged) + 1))


def test_saves_by_the_clock_happen_at_the_same_step_in_every_process(tmp_path):
    """checkpoint_per_hours of 0.3 seconds: each process's own clock used to pick the save steps, and the
    processes aborted at the first save they disagreed on ('a distributed collective mismatch')."""
    steps = 30
    workers, out = start_training(tmp_path, "--max_training_step", str(steps), checkpoint_per_steps=1000,
                                  checkpoint_per_hours=0.3 / 3600, max_to_keep_save=100)
    with killed_at_exit(workers):
        errors = [worker.communicate(timeout=240)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for err in errors]
    saved = sorted(int(path.name) for path in out.iterdir() if path.name.isdigit())
    assert logged_steps(out) == list(range(1, steps + 1))
    # the end's save and at least two by the clock (30 steps saved 7 times on a 2-core host, 80 took 50 s)
    assert saved[-1] == steps and len(saved) >= 3, saved


def test_eval_files_that_split_unevenly_over_the_processes(tmp_path, capsys):
    """--eval_files of two files, one per process, of 10 and 1 batches: every process must run as many eval
    steps as the others (they are collective). The first process used to run its 4 alone and abort the run."""
    evals = tmp_path / "eval"
    evals.mkdir()
    write_records(evals / "eval-0.tfrecord", counting_corpus(40, 16, 128, seed=3, period=8))
    write_records(evals / "eval-1.tfrecord", counting_corpus(4, 16, 128, seed=4, period=8))
    workers, out = start_training(tmp_path, "--max_training_step", "4", "--eval_files", str(evals / "*.tfrecord"),
                                  checkpoint_per_steps=2)
    with killed_at_exit(workers):
        errors = [worker.communicate(timeout=240)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for err in errors]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "eval"] == [2, 4]

    # Resumed by one process: allowed, but its reader splits the files otherwise, so it says so.
    state = run(RunConfig(parameter_file=str(tmp_path / "model" / "parameters.json"), progress=False,
                          input_files=str(tmp_path / "train-*.tfrecord"), max_training_step=5))
    assert int(state.step) == 5
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: {out}: resuming step 4 with other settings than the run that saved it (processes 2 -> 1); "
        "reading goes on from batch 4 of the data given now"]


def test_a_process_whose_files_hold_no_records_stops_every_process_with_one_error(tmp_path):
    """The second process's file is empty: it used to read its empty files over and over, forever, while the
    first waited for it in the first step (SIGTERM did not stop them either)."""
    (tmp_path / "train-1.tfrecord").write_bytes(b"")
    workers, out = start_training(tmp_path)
    with killed_at_exit(workers):
        errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [2, 2], [err[-2000:] for err in errors]
    expected = (f"error: process 1: --input_files {tmp_path / 'train-*.tfrecord'}: 0 records in "
                f"{tmp_path / 'train-1.tfrecord'}, expected at least 1")
    assert [err.splitlines()[-1] for err in errors] == [expected, expected]
    assert not out.exists()


def test_a_bad_record_in_one_process_saves_an_agreed_step_and_stops_every_process(tmp_path):
    """The second process meets a corrupt record in its first batch: it used to print the error and hang at
    exit, with the first process waiting for it in a step, and no checkpoint. Now it asks for a stop as a
    preemption does, trains with a batch of no targets until the agreed step, and both save and stop."""
    corpus = counting_corpus(8, 16, 128, seed=5, period=8)
    bad = write_records(tmp_path / "train-1.tfrecord", corpus)  # the first check reads 4 records: these pass
    with open(bad, "ab") as f:
        f.write(b"\x07" * 40)
    workers, out = start_training(tmp_path, checkpoint_per_steps=1000)
    with killed_at_exit(workers):
        errors = [worker.communicate(timeout=240)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [2, 2], [err[-2000:] for err in errors]
    stopped = max(logged_steps(out))
    assert logged_steps(out) == list(range(1, stopped + 1))
    assert sorted(path.name for path in out.iterdir() if path.name.isdigit()) == [str(stopped)]
    expected = (f"error: process 1: {bad}: record 8 is corrupt (length checksum mismatch); the run saved step "
                f"{stopped} in {out} and stopped (mend or remove the file, then run the same command to go on)")
    assert [err.splitlines()[-1] for err in errors] == [expected, expected]
