"""Resuming: k steps + restart + k steps equals 2k steps straight (float32, CPU), and a run killed with
SIGKILL restarts from its last completed checkpoint."""

import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptsan.errors import UserError
from gptsan.model.params import expected_shapes, flatten
from gptsan.train.config import RunConfig
from gptsan.train.loop import StopFlag, run, warn_of_folded_classes, warn_of_ignored_prefixes
from gptsan.train.optim import make_optimizer
from gptsan.train.state import change_trainable_set
from gptsan.train.step import StepOptions
from tests.train_support import (
    MINI_TRAIN_PARAMS,
    counting_corpus,
    killed_at_exit,
    logged_steps,
    mini_config,
    wait_for,
    write_mini_parameters,
    write_records,
)

ROOT = Path(__file__).resolve().parents[1]


def corpus_files(tmp_path: Path) -> str:
    write_records(tmp_path / "train-0.tfrecord", counting_corpus(40, 16, 128, seed=0, period=8))
    write_records(tmp_path / "train-1.tfrecord", counting_corpus(40, 16, 128, seed=1, period=8))
    return str(tmp_path / "train-*.tfrecord")


def host_params(state) -> dict:
    return {name: np.asarray(jax.device_get(value)) for name, value in flatten(state.all_params).items()}


def test_resume_continues_exactly(tmp_path, capsys):
    files = corpus_files(tmp_path)
    k = 6
    straight_file = write_mini_parameters(tmp_path / "a", tmp_path / "a-out", checkpoint_per_steps=100)
    resumed_file = write_mini_parameters(tmp_path / "b", tmp_path / "b-out", checkpoint_per_steps=100)
    common = dict(input_files=files, spout_vector="uniform", progress=False, log_every=1)

    straight = run(RunConfig(parameter_file=str(straight_file), max_training_step=2 * k, **common))
    first = run(RunConfig(parameter_file=str(resumed_file), max_training_step=k, **common))
    assert int(first.step) == k
    capsys.readouterr()
    resumed = run(RunConfig(parameter_file=str(resumed_file), max_training_step=2 * k, **common))
    assert "warning:" not in capsys.readouterr().err  # the same settings: nothing to say

    assert int(resumed.step) == int(straight.step) == 2 * k
    assert int(resumed.data_position) == 2 * k
    want, got = host_params(straight), host_params(resumed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    want_opt = jax.tree_util.tree_leaves(jax.device_get(straight.opt_state))
    got_opt = jax.tree_util.tree_leaves(jax.device_get(resumed.opt_state))
    for a, b in zip(want_opt, got_opt, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    metrics = (tmp_path / "b-out" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    assert steps == list(range(1, 2 * k + 1))  # the restart went on from step k + 1


def test_resuming_on_other_data_says_so_in_one_line(tmp_path, capsys):
    files = corpus_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    more = counting_corpus(40, 16, 128, seed=2, period=8)
    more["i"] %= 8  # class ids the mini model's 8 spout classes hold
    write_records(other / "more-0.tfrecord", more)
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "m-out", checkpoint_per_steps=100)
    common = dict(parameter_file=str(parameter_file), progress=False, log_every=1)
    run(RunConfig(input_files=files, spout_vector="uniform", max_training_step=2, **common))
    capsys.readouterr()
    state = run(RunConfig(input_files=str(other / "*.tfrecord"), spout_vector="onehot", max_training_step=3,
                          **common))
    assert int(state.step) == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'm-out'}: resuming step 2 with other settings than the run that saved it "
        f"(input_files {files!r} -> {str(other / '*.tfrecord')!r}; spout_vector 'uniform' -> 'onehot'); "
        "reading goes on from batch 2 of the data given now"]


def test_resuming_with_another_batch_size_reads_on_from_the_same_record(tmp_path, monkeypatch, capsys):
    """train_params.batch_size changed between runs: the resumed run reads on from the record the first stopped
    at (it used to skip as many batches of the new size: 2 steps of 16, resumed at 8, re-read records 16-31)."""
    import gptsan.train.loop as loop
    from gptsan.train.checkpoint import Checkpointer

    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    run(RunConfig(parameter_file=str(write_mini_parameters(tmp_path / "m", out, batch_size=16)), input_files=files,
                  max_training_step=2, progress=False))
    starts = []

    def recording(*args, **kwargs):
        starts.append(kwargs.get("start_record", 0) + kwargs.get("start_step", 0) * args[2])
        return make_dataset(*args, **kwargs)

    make_dataset = loop.make_dataset
    monkeypatch.setattr(loop, "make_dataset", recording)
    capsys.readouterr()
    state = run(RunConfig(parameter_file=str(write_mini_parameters(tmp_path / "m", out, batch_size=8)),
                          input_files=files, max_training_step=4, progress=False))
    assert int(state.step) == 4 and starts == [2 * 16]
    assert "warning:" not in capsys.readouterr().err
    checkpointer = Checkpointer(str(out), max_to_keep=3, every_steps=0, every_hours=0)
    try:
        assert checkpointer.latest_step() == 4 and checkpointer.saved_run()["records_read"] == 2 * 16 + 2 * 8
    finally:
        checkpointer.close()


def test_resuming_on_a_glob_that_now_matches_other_files_says_so(tmp_path, capsys):
    """The same --input_files, but a file added to what it matches: the data position now counts through other
    data, which was as silent as a changed --input_files was not."""
    files = corpus_files(tmp_path)
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "out")
    common = dict(parameter_file=str(parameter_file), input_files=files, progress=False)
    run(RunConfig(max_training_step=2, **common))
    write_records(tmp_path / "train-2.tfrecord", counting_corpus(40, 16, 128, seed=2, period=8))
    capsys.readouterr()
    assert int(run(RunConfig(max_training_step=3, **common)).step) == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.fullmatch(
        rf"warning: {re.escape(str(tmp_path / 'out'))}: resuming step 2 with other settings than the run that saved "
        r"it \(input_data '2 files, \d+ bytes, #\w{8}' -> '3 files, \d+ bytes, #\w{8}'\); reading goes on from "
        r"batch 2 of the data given now", warnings[0]), warnings


def test_resuming_adamw_cosine_with_another_length_says_so_in_one_line(tmp_path, capsys):
    """--max_training_step is adamw_cosine's length: resumed with another, the cosine is stretched and its
    learning rate jumps at the resumed step, which it did without a word."""
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "out", num_warmup_steps=1)
    common = dict(parameter_file=str(parameter_file), input_files=corpus_files(tmp_path), optimizer="adamw_cosine",
                  progress=False)
    run(RunConfig(max_training_step=2, **common))
    capsys.readouterr()
    assert int(run(RunConfig(max_training_step=3, **common)).step) == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'out'}: resuming step 2 with other settings than the run that saved it "
        "(max_training_step (adamw_cosine's length: the learning rate jumps) 2 -> 3); reading goes on from batch 2 "
        "of the data given now"]


def test_lm_training_on_records_with_prefixes_says_so_in_one_line(tmp_path, capsys):
    corpus = counting_corpus(16, 16, 128, period=8)
    corpus["num_input"] = np.arange(16) % 5  # as --mode hybrid encodes: some records with a prefix
    write_records(tmp_path / "hybrid.tfrecord", corpus)
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "m-out", checkpoint_per_steps=100)
    run(RunConfig(parameter_file=str(parameter_file), input_files=str(tmp_path / "hybrid.tfrecord"), mode="lm",
                  max_training_step=1, progress=False))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: --input_files {tmp_path / 'hybrid.tfrecord'}: the records have prefixes (num_input > 1: encoded "
        "with --mode hybrid or mlm) but training runs in lm mode, which ignores them; give --mode hybrid to train "
        "them as prefixes"]
    # nothing to say in hybrid mode, or in lm mode on records without prefixes: num_input counts the start
    # token, so gptsan-encode --mode lm writes 1
    warn_of_ignored_prefixes("x", StepOptions(mode="hybrid"), {"num_input": np.array([1, 3])})
    warn_of_ignored_prefixes("x", StepOptions(mode="lm"), {"num_input": np.array([1, 1])})
    warn_of_ignored_prefixes("x", StepOptions(mode="lm"), {"num_input": np.array([0, 1])})
    assert capsys.readouterr().err == ""


def test_onehot_training_on_class_ids_past_the_spout_says_so_in_one_line(tmp_path, capsys):
    """one_hot(i mod C): class ids C apart trained one vector without a word, and gptsan-generate refuses
    --spout C or more, so such a class could not be asked for either."""
    corpus = counting_corpus(16, 16, 128, period=8)
    corpus["i"] = np.full(16, 11)
    write_records(tmp_path / "classes.tfrecord", corpus)
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "m-out", checkpoint_per_steps=100)
    run(RunConfig(parameter_file=str(parameter_file), input_files=str(tmp_path / "classes.tfrecord"),
                  spout_vector="onehot", max_training_step=1, progress=False))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: --spout_vector onehot: --input_files {tmp_path / 'classes.tfrecord'} has class id 11 (in the "
        "first batch), but the spout has 8 classes: ids are taken mod 8, so it trains class 3's vector (encode "
        "class ids 0..7, or convert the model with a larger gptsan-convert --num_spout)"]
    warn_of_folded_classes("x", StepOptions(spout="half_onehot"), 8, {"i": np.array([0, 5])})  # half: 4 classes
    assert "has class id 5 (in the first batch), but the spout has 4 classes: ids are taken mod 4, so it trains " \
        "class 1's vector (encode class ids 0..3," in capsys.readouterr().err
    # ids within the classes, or spouts that do not take classes: nothing to say
    for spout, ids in (("onehot", [0, 7]), ("half_onehot", [0, 3]), ("uniform", [99, -1]), ("none", [99, 99])):
        warn_of_folded_classes("x", StepOptions(spout=spout), 8, {"i": np.array(ids)})
    assert capsys.readouterr().err == ""
    warn_of_folded_classes("x", StepOptions(spout="onehot"), 8, {"i": np.array([3, -1])})
    assert "has class id -1" in capsys.readouterr().err


def start_run_training(tmp_path: Path, **train_params):
    """run_training.py in a subprocess on the mini model (with the suite's compilation cache, tests/conftest.py):
    (the process, its output_dir, its parameter file, its input pattern)."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, **train_params)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run_training.py"), "--input_files", files, "--parameter_file",
           str(parameter_file), "--log_every", "1", "--no_progress"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, out, parameter_file, files


def test_sigkill_loses_at_most_the_steps_since_the_last_save(tmp_path):
    process, out, parameter_file, files = start_run_training(tmp_path, checkpoint_per_steps=5)
    with killed_at_exit([process]):
        # Orbax renames a checkpoint into place once it is complete
        wait_for(lambda: (out / "15").exists(), [process], "checkpoint 15")
        process.send_signal(signal.SIGKILL)
    logged = logged_steps(out)
    killed_at = max(logged)
    last_save = ocp.CheckpointManager(out).latest_step()
    assert last_save >= 15 and last_save % 5 == 0
    # at most the steps since the last save, plus one save period when that save was still being written: step
    # N + 5 is logged, then its save waits for save N, so the last complete one can be N - 5
    assert killed_at - last_save <= 5 + 5

    state = run(RunConfig(parameter_file=str(parameter_file), input_files=files, progress=False,
                          log_every=1, max_training_step=last_save + 2))
    assert int(state.step) == last_save + 2
    steps_after = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the rows of steps the killed run logged after its last save are gone: they were in the file twice
    assert steps_after == [step for step in logged if step <= last_save] + [last_save + 1, last_save + 2]
    assert len(set(steps_after)) == len(steps_after)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_or_ctrl_c_saves_the_step_reached_and_exits_0(tmp_path, signum):
    """SIGTERM (a preempted VM) or a first Ctrl-C: the step in flight ends, its checkpoint is saved, exit 0. A
    Ctrl-C used to exit 130 at once, losing every step since the last periodic save."""
    process, out, _, _ = start_run_training(tmp_path, checkpoint_per_steps=1000)
    with killed_at_exit([process]):
        wait_for(lambda: len(logged_steps(out)) >= 3, [process], "3 steps")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    if signum == signal.SIGINT:
        assert ("interrupt: saving a checkpoint after this step, then stopping (Ctrl-C again: stop without "
                "saving)") in stderr
    logged = logged_steps(out)
    assert ocp.CheckpointManager(out).all_steps() == [max(logged)] and max(logged) >= 3
    stopped = max(logged)
    assert re.fullmatch(rf"training: stopped on request after step {stopped} \(steps 1-{stopped} in \d+ s; step "
                        rf"{stopped} saved in {re.escape(str(out))}\): run the same command to go on",
                        stderr.splitlines()[-1])


def test_a_second_ctrl_c_stops_without_saving(capsys, caplog):
    """...and without Orbax's report of the save it cut short (`ERROR:absl:... Save Finalize thread
    (save_finalize) failed.` and a traceback used to come before `interrupted`)."""
    previous = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and capsys.readouterr().err == ""
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and capsys.readouterr().err.startswith("\ninterrupt: saving a checkpoint")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in the main thread at the next bytecode
        logging.getLogger("absl").error("Save Finalize thread (save_finalize) failed.")  # as Orbax reports it
        assert caplog.records == []
    assert signal.getsignal(signal.SIGINT) is previous
    with StopFlag(progress=False):  # no progress bar to end the line of: the notice has no empty line before it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    assert capsys.readouterr().err.startswith("interrupt: saving a checkpoint")
    logging.getLogger("absl").error("a run that goes on logs again")
    assert [record.getMessage() for record in caplog.records] == ["a run that goes on logs again"]


def test_a_ctrl_c_ignored_when_the_run_starts_stays_ignored():
    """A run started in the background of a script ignores SIGINT (the shell's doing; cli_main keeps it so): a
    Ctrl-C meant for the script's foreground command used to stop the run too, as the loop put its own handler in."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopFlag() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)  # preemption is still caught
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_save_cut_short_is_cleared_away_by_the_next_run(tmp_path):
    """A second Ctrl-C (or a kill) in the middle of a save left `STEP.orbax-checkpoint-tmp` in output_dir for
    good; the next run now removes it."""
    out = tmp_path / "out"
    common = dict(parameter_file=str(write_mini_parameters(tmp_path / "model", out)),
                  input_files=corpus_files(tmp_path), progress=False)
    run(RunConfig(max_training_step=1, **common))
    partial = out / "7.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    partial.mkdir(parents=True)
    (partial / "chunk").write_bytes(b"half")
    run(RunConfig(max_training_step=2, **common))
    assert sorted(path.name for path in out.iterdir() if path.name[0].isdigit()) == ["1", "2"]


def test_a_save_cut_short_is_gone_before_the_run_goes_on(tmp_path):
    """Orbax clears such folders in a thread of its own that only a save waited for: a run refused before its
    first save (a resume with another --optimizer) exited while it ran, and printed its traceback ("cannot
    schedule new futures after shutdown") after the error line, 2 of 15 times."""
    from gptsan.train.checkpoint import Checkpointer

    for step in range(20):
        (tmp_path / f"{step}.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=3, every_steps=10, every_hours=1)
    assert list(tmp_path.iterdir()) == []
    checkpointer.close()


def test_a_truncated_latest_checkpoint_is_one_clear_error(tmp_path):
    """Resuming from a checkpoint whose data files were cut short: a UserError naming the output_dir, the
    step and the way out, not Orbax's exception."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, checkpoint_per_steps=100)
    common = dict(parameter_file=str(parameter_file), input_files=files, progress=False, log_every=1)
    run(RunConfig(max_training_step=2, **common))
    chunks = list((out / "2" / "state").rglob("d/*"))
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot resume from its step-2 checkpoint .*move 2/ aside") as caught:
        run(RunConfig(max_training_step=4, **common))
    assert str(out) in str(caught.value) and "\n" not in str(caught.value)


def test_relative_paths_checkpoint_resume_and_load(tmp_path, monkeypatch):
    """A hand-written parameters.json with a relative output_dir, and relative --model paths: Orbax takes only
    absolute paths, so each must be made absolute before it gets there (a relative one used to leave only
    *.orbax-checkpoint-tmp folders, restart at step 1, and fail to load as 'not a readable checkpoint')."""
    from gptsan.checkpoint import load_flat, native

    files = corpus_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    parameter_file = write_mini_parameters(Path("model"), "out", checkpoint_per_steps=2)
    common = dict(parameter_file=str(parameter_file), input_files=files, progress=False, log_every=1)
    run(RunConfig(max_training_step=2, **common))
    assert (tmp_path / "out" / "2" / "state").is_dir()
    state = run(RunConfig(max_training_step=4, **common))
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    config, params = load_flat("out")  # the newest training checkpoint, through a relative path
    want = host_params(state)
    assert sorted(params) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    native.save("native", config, params)  # a native model directory written and read back relatively
    _, again = load_flat("native")
    for name, value in want.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_eval_loss_at_each_save_and_at_the_end(tmp_path):
    """--eval_files: an eval row at every checkpoint save, the final one too (a run shorter than
    checkpoint_per_steps used to get none, and no run got one at its last step)."""
    files = corpus_files(tmp_path)
    parameter_file = write_mini_parameters(tmp_path / "model", tmp_path / "out", checkpoint_per_steps=2)
    run(RunConfig(parameter_file=str(parameter_file), input_files=files, eval_files=files, eval_batches=2,
                  progress=False, log_every=1, max_training_step=3))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row["split"] == "eval"]
    assert [row["step"] for row in evals] == [2, 3]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in evals)
    assert evals[0]["loss"] != evals[1]["loss"]  # the model changed between the saves


@pytest.mark.parametrize("base_lr", [1e-3, 1e30])
def test_skipped_steps_are_counted_and_float32_divergence_is_one_warning(tmp_path, capsys, base_lr):
    """A float32 step whose gradients are not finite is skipped (parameters kept), as a float16 overflow is;
    but float32 has no loss scale to lower, so it means divergence, and it used to go on without a word (only
    the log step's own `skipped` flag, and NaN losses). At lr 1e30 the first update makes every later
    gradient overflow: each log row counts its interval's skips and one warning says what to do."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, base_lr=base_lr, num_warmup_steps=0)
    run(RunConfig(parameter_file=str(parameter_file), input_files=files, progress=False, log_every=2,
                  max_training_step=6))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if base_lr < 1:
        assert [row["skipped_steps"] for row in rows] == [0, 0, 0] and warnings == []
        return
    assert [(row["step"], row["skipped_steps"], row["skipped"]) for row in rows] == [
        (2, 1, True), (4, 2, True), (6, 2, True)]
    assert warnings == [
        "warning: step 2: 1 of the last 2 steps had non-finite gradients and were skipped (parameters kept); "
        "float32 training has no loss scale to lower, so the run is diverging: lower base_lr or clip with "
        f"--clip_gradients (later skips are counted in {out / 'metrics.jsonl'}'s skipped_steps)"]


def test_float16_skips_warn_only_once_its_loss_scale_is_down_to_1(tmp_path, capsys):
    """float16 skips steps to find its loss scale (halved at each); only when it is down to 1 and steps are
    still skipped is the run diverging."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, base_lr=1e30, num_warmup_steps=0)
    run(RunConfig(parameter_file=str(parameter_file), input_files=files, progress=False, log_every=4,
                  max_training_step=24, use_mixed_precision=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["loss_scale"], row["skipped_steps"]) for row in rows] == [
        (2.0**13, 3), (2.0**9, 4), (2.0**5, 4), (2.0, 4), (1.0, 4), (1.0, 4)]  # halved at each skip from 2**15
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        "warning: step 20: 4 of the last 4 steps had non-finite gradients and were skipped (parameters kept); its "
        "loss scale is down to 1, so the run is diverging: lower base_lr or clip with --clip_gradients (later "
        f"skips are counted in {out / 'metrics.jsonl'}'s skipped_steps)"]


def test_running_a_finished_run_again_says_there_is_nothing_to_train(tmp_path, capsys):
    """It exited 0 without a word, as if it had trained."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out)
    for max_step in (2, 2, 1):
        state = run(RunConfig(parameter_file=str(parameter_file), input_files=files, progress=False,
                              log_every=1, max_training_step=max_step))
        assert int(state.step) == 2
    assert logged_steps(out) == [1, 2]
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning:")] == [
        f"warning: train_params.output_dir {out}: the run is at step 2 already, --max_training_step is {max_step}: "
        "nothing to train (give a larger --max_training_step to go on)" for max_step in (2, 1)]
    # the run's last line says what it trained and where that is; the runs that trained nothing have none
    assert [re.sub(r"in \d+ s", "in N s", line) for line in err if line.startswith("training:")] == [
        f"training: steps 1-2 in N s; step 2 saved in {out}"]


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_holds_it(tmp_path):
    """The same command started twice: both runs saved the same steps, one died in Orbax's renames with a
    traceback, the other hung, and the folder kept a half-written checkpoint. The second run is now refused
    before it writes anything; the lock goes with the run that held it."""
    import socket

    from gptsan.train.output_lock import output_dir_lock

    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    config = RunConfig(parameter_file=str(write_mini_parameters(tmp_path / "model", out)), input_files=files,
                       progress=False, max_training_step=2)
    with output_dir_lock(str(out)) as problem:  # the first run (this process, through another open file)
        assert problem is None
        with pytest.raises(UserError) as caught:
            run(config)
        assert sorted(path.name for path in out.iterdir()) == [".gptsan-train.lock"]
    assert re.fullmatch(rf"train_params\.output_dir {re.escape(str(out))}: another training run is writing there "
                        rf"\(process {os.getpid()} on {re.escape(socket.gethostname())}, started [^)]+\); wait for "
                        "it to end or stop it, or give another output_dir", str(caught.value))
    assert int(run(config).step) == 2


def test_fewer_training_records_than_a_batch_are_repeated_to_fill_it(tmp_path):
    """3 records and batches of 8: the reader repeats them (the first check used to want a whole batch and
    ended in a StopIteration traceback)."""
    path = write_records(tmp_path / "train.tfrecord", counting_corpus(3, 16, 128, period=8))
    parameter_file = write_mini_parameters(tmp_path / "model", tmp_path / "out")
    state = run(RunConfig(parameter_file=str(parameter_file), input_files=str(path), progress=False,
                          max_training_step=2))
    assert int(state.step) == 2 and int(state.data_position) == 2


def corrupt_after(path: Path, corpus: dict, good: int) -> Path:
    """The first `good` records of `corpus` as tfrecords in `path`, then bytes that are no record."""
    write_records(path, {name: value[:good] for name, value in corpus.items()})
    with open(path, "ab") as f:
        f.write(b"\x07" * 40)
    return path


def test_a_bad_record_met_while_training_saves_the_last_good_step_and_stops(tmp_path, monkeypatch):
    """A corrupt record past the first check (which reads a batch) used to end the run with the error and no
    checkpoint: every step since the last periodic save was lost. Now the last good step is saved; running
    again goes on to the record and stops there."""
    from gptsan.train import loop

    monkeypatch.setattr(loop, "make_dataset", functools.partial(loop.make_dataset, shuffle_buffer=16))
    path = corrupt_after(tmp_path / "train.tfrecord", counting_corpus(1200, 16, 128, period=8), good=1100)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, checkpoint_per_steps=1000)
    config = RunConfig(parameter_file=str(parameter_file), input_files=str(path), progress=False, log_every=1)
    with pytest.raises(UserError) as caught:
        run(config)
    stopped = max(logged_steps(out))
    assert stopped >= 1 and logged_steps(out) == list(range(1, stopped + 1))
    assert ocp.CheckpointManager(out).all_steps() == [stopped]
    assert str(caught.value) == (f"{path}: record 1100 is corrupt (length checksum mismatch); the run saved step "
                                 f"{stopped} in {out} and stopped (mend or remove the file, then run the same "
                                 "command to go on)")
    # Running again trains the good batches that were waiting in the reader's buffers when it met the record
    # (the batches, read again, are the same), saves the last and stops there.
    with pytest.raises(UserError, match=r"record 1100 is corrupt .*; the run (saved step \d+|stopped before its "
                       r"first step)") as again:
        run(config)
    resumed = max(logged_steps(out))
    assert ocp.CheckpointManager(out).latest_step() == resumed and stopped <= resumed <= 1100 // 8
    assert logged_steps(out) == list(range(1, resumed + 1))
    assert (f"saved step {resumed} in" in str(again.value)) == (resumed > stopped)


def test_skip_corrupt_records_trains_on_with_a_warning_each_time(tmp_path, capsys):
    """--skip_corrupt_records: the run trains past the corrupt tail of its file (the original skipped such
    records silently), with one warning line for it, although the reader meets it every epoch (filling the
    shuffle buffer reads a small file hundreds of times: a 20-record file gave 511 warnings in a 6-step run,
    before they were kept to the first)."""
    path = corrupt_after(tmp_path / "train.tfrecord", counting_corpus(40, 16, 128, period=8), good=32)
    parameter_file = write_mini_parameters(tmp_path / "model", tmp_path / "out")
    state = run(RunConfig(parameter_file=str(parameter_file), input_files=str(path), progress=False,
                          max_training_step=9, skip_corrupt_records=True))
    assert int(state.step) == 9  # 4 batches an epoch: the reader went through the corrupt tail 3 times at least
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped {path}: record 32 is corrupt (length checksum mismatch); rest of the file "
                        "skipped"]


def test_skip_corrupt_records_warns_once_a_run_for_a_record_met_by_the_check_and_every_eval(tmp_path, capsys):
    """The start-up check and the training reader both meet a corrupt record within the first batch, and each
    eval reads its files afresh: each reader used to warn for itself (5 lines here: the training record twice,
    the eval record at each of the 3 evals)."""
    path = corrupt_after(tmp_path / "train.tfrecord", counting_corpus(40, 16, 128, period=8), good=4)
    evals = corrupt_after(tmp_path / "eval.tfrecord", counting_corpus(20, 16, 128, period=8), good=10)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, checkpoint_per_steps=2)
    state = run(RunConfig(parameter_file=str(parameter_file), input_files=str(path), eval_files=str(evals),
                          eval_batches=2, progress=False, log_every=1, max_training_step=6, skip_corrupt_records=True))
    assert int(state.step) == 6
    eval_steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if row["split"] == "eval"]
    assert eval_steps == [2, 4, 6]  # one batch each: the second stops at the corrupt tail
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped {file}: record {good} is corrupt (length checksum mismatch); rest of the "
                        "file skipped" for file, good in ((path, 4), (evals, 10))]


def test_a_bad_eval_record_saves_and_stops(tmp_path):
    """A corrupt eval record past the first check (a batch): the run stops after the checkpoint whose eval met it."""
    files = corpus_files(tmp_path)
    evals = corrupt_after(tmp_path / "eval.tfrecord", counting_corpus(20, 16, 128, period=8), good=10)
    out = tmp_path / "out"
    parameter_file = write_mini_parameters(tmp_path / "model", out, checkpoint_per_steps=2)
    with pytest.raises(UserError) as caught:
        run(RunConfig(parameter_file=str(parameter_file), input_files=files, eval_files=str(evals), eval_batches=2,
                      progress=False, log_every=1, max_training_step=6))
    assert str(caught.value) == (f"{evals}: record 10 is corrupt (length checksum mismatch); the run saved step 2 "
                                 f"in {out} and stopped (mend or remove the file, then run the same command to go on)")
    assert logged_steps(out) == [1, 2] and ocp.CheckpointManager(out).all_steps() == [2]


def test_another_model_in_the_output_dir_is_refused_before_anything_is_overwritten(tmp_path):
    """A changed parameter shape on resume used to overwrite output_dir/parameters.json before the restore
    failed (leaving the run unreadable by the other tools), then print Orbax tracebacks."""
    files = corpus_files(tmp_path)
    out = tmp_path / "out"
    run(RunConfig(parameter_file=str(write_mini_parameters(tmp_path / "a", out, checkpoint_per_steps=100)),
                  input_files=files, progress=False, max_training_step=2))
    saved = (out / "parameters.json").read_text()
    other = write_mini_parameters(tmp_path / "b", out, checkpoint_per_steps=100)
    data = json.loads(other.read_text())
    data["model_params"].update(num_hidden=16, num_pallarelizm=2)  # num_pallarelizm may change; num_hidden not
    other.write_text(json.dumps(data))
    with pytest.raises(UserError) as caught:
        run(RunConfig(parameter_file=str(other), input_files=files, progress=False, max_training_step=4))
    assert str(caught.value) == (f"train_params.output_dir {out}: holds a run of another model (num_hidden 32 -> 16); "
                                 "give a new output_dir")
    assert (out / "parameters.json").read_text() == saved


def test_resuming_with_another_ignore_list_keeps_what_fits_and_says_so(tmp_path, capsys):
    """Extended-only training, then the whole model from the same output_dir (the checkpoint's optimizer state
    covers only the parameters trainable then). It used to fail as 'truncated, corrupt or from another model'."""
    names = list(expected_shapes(mini_config()))
    backbone = sorted(name for name in names if name.startswith("model/") and "1/" not in name)
    (tmp_path / "ignore.json").write_text(json.dumps(backbone))
    files = corpus_files(tmp_path)
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "out", checkpoint_per_steps=100)
    common = dict(parameter_file=str(parameter_file), input_files=files, progress=False, log_every=1)
    first = run(RunConfig(ignore_parameters=str(tmp_path / "ignore.json"), max_training_step=2, **common))
    capsys.readouterr()
    resumed = run(RunConfig(max_training_step=3, **common))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'out'}: resuming step 2 with another --ignore_parameters than the run that saved it "
        f"({len(backbone)} parameters newly trainable, 0 newly frozen): the newly trainable start with zero "
        "optimizer moments at the current learning rate, with no new warmup (a new train_params.output_dir starts "
        "over, at step 0, from these parameters)"]
    assert int(resumed.step) == 3 and int(resumed.data_position) == 3
    assert flatten(resumed.frozen) == {}
    before, after = host_params(first), host_params(resumed)
    assert all(not np.array_equal(before[name], after[name]) for name in backbone)  # trained now
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_freezing_more_on_resume_says_what_happens_to_the_newly_frozen(capsys):
    """It said "the newly trainable start with zero optimizer moments" with none newly trainable."""
    from types import SimpleNamespace

    from gptsan.train.loop import warn_of_changed_trainable_set

    warn_of_changed_trainable_set("out", SimpleNamespace(step=5), frozenset({"a"}), frozenset({"a", "b"}))
    assert capsys.readouterr().err == (
        "warning: out: resuming step 5 with another --ignore_parameters than the run that saved it (0 parameters "
        "newly trainable, 1 newly frozen): the newly frozen keep their values and lose their optimizer moments (a "
        "new train_params.output_dir starts over, at step 0, from these parameters)\n")


def test_an_ignore_list_over_a_fresh_initialisation_is_a_warning(tmp_path, capsys):
    """A fine-tune whose parameter file's folder held no model froze random parameters without a word."""
    ignore = tmp_path / "ignore.json"
    ignore.write_text(json.dumps(["model/wte", "model/wpe"]))
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "out", checkpoint_per_steps=100)
    common = dict(parameter_file=str(parameter_file), input_files=corpus_files(tmp_path), progress=False,
                  ignore_parameters=str(ignore))
    run(RunConfig(max_training_step=1, **common))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --ignore_parameters {ignore}: no model in {tmp_path / 'm'} (the folder of "
                        f"--parameter_file) and no checkpoint in train_params.output_dir {tmp_path / 'out'}: the 2 "
                        f"parameters it freezes stay as freshly initialised (--seed {RunConfig.seed})"]
    run(RunConfig(max_training_step=2, **common))  # resumed from its checkpoint: no warning
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_change_trainable_set_carries_the_optimizer_state_by_parameter(tmp_path):
    """The state a resumed run starts from when the ignore list changed: parameters, step and data position as
    saved; moments kept for parameters trainable before and now, zero for the newly trainable; step counts kept."""
    names = list(expected_shapes(mini_config()))
    before_frozen = frozenset(name for name in names if name.startswith("model/") and "1/" not in name)
    now_frozen = frozenset({"model/att1/o/kernel", "model/wte"})
    (tmp_path / "ignore.json").write_text(json.dumps(sorted(before_frozen)))
    parameter_file = write_mini_parameters(tmp_path / "m", tmp_path / "out", checkpoint_per_steps=100)
    saved = run(RunConfig(parameter_file=str(parameter_file), input_files=corpus_files(tmp_path), progress=False,
                          spout_vector="uniform", ignore_parameters=str(tmp_path / "ignore.json"),
                          max_training_step=3))
    optimizer, _ = make_optimizer("adam", MINI_TRAIN_PARAMS["base_lr"], MINI_TRAIN_PARAMS["num_warmup_steps"])

    changed = jax.jit(functools.partial(change_trainable_set, frozen_names=now_frozen, optimizer=optimizer))(saved)

    assert sorted(flatten(changed.frozen)) == sorted(now_frozen)
    for name, value in host_params(saved).items():
        np.testing.assert_array_equal(host_params(changed)[name], value, err_msg=name)
    assert int(changed.step) == int(saved.step) == 3 and int(changed.data_position) == 3
    np.testing.assert_array_equal(np.asarray(changed.rng), np.asarray(saved.rng))
    adam_before, adam_now = saved.opt_state[0], changed.opt_state[0]
    for moments_before, moments_now in ((adam_before.mu, adam_now.mu), (adam_before.nu, adam_now.nu)):
        kept, now = flatten(moments_before), flatten(moments_now)
        assert sorted(now) == sorted(set(names) - now_frozen)
        for name, value in now.items():
            if name in before_frozen:  # newly trainable
                assert not np.any(np.asarray(value)), name
            else:
                assert np.any(np.asarray(value)), name  # trained for 3 steps
                np.testing.assert_array_equal(np.asarray(value), np.asarray(kept[name]), err_msg=name)
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(changed.opt_state)[0]
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(int(count) == 3 for count in counts)  # the learning-rate schedule goes on


def test_resuming_with_another_optimizer_or_clipping_names_the_flags(tmp_path):
    """It said the checkpoint was truncated or corrupt and to move it aside, though every checkpoint of the run
    would fail the same way: their optimizer state is the other optimizer's."""
    out = tmp_path / "out"
    common = dict(parameter_file=str(write_mini_parameters(tmp_path / "model", out)),
                  input_files=corpus_files(tmp_path), progress=False)
    run(RunConfig(max_training_step=1, **common))
    with pytest.raises(UserError) as caught:
        run(RunConfig(max_training_step=20, optimizer="adamw_cosine", clip_gradients=0.01, **common))
    assert str(caught.value) == (f"{out}: its step-1 checkpoint holds the optimizer state of --optimizer adam (now "
                                 "adamw_cosine) and --clip_gradients off (now 0.01); resume with the flags that "
                                 "saved it, or give another output_dir")
    assert int(run(RunConfig(max_training_step=2, **common)).step) == 2


def test_a_run_stopped_on_request_logs_its_last_step(tmp_path, monkeypatch):
    """--log_every N writes metrics every N steps and at the last; a run stopped by SIGTERM or Ctrl-C saved its
    last step but logged only up to the last multiple of N (stopped after step 1471, last row 1400)."""
    from gptsan.train import loop

    def stopped_at_step_6(*args, **kwargs):
        for index, batch in enumerate(real_dataset(*args, **kwargs)):
            if index == 5:  # the batch of step 6: a preemption notice comes while it trains
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    real_dataset = loop.make_dataset
    monkeypatch.setattr(loop, "make_dataset", stopped_at_step_6)
    out = tmp_path / "out"
    run(RunConfig(parameter_file=str(write_mini_parameters(tmp_path / "model", out)),
                  input_files=corpus_files(tmp_path), progress=False, log_every=100))
    assert logged_steps(out) == [6]
    assert ocp.CheckpointManager(out).all_steps() == [6]
