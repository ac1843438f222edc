"""Bad inputs stop `gptsan-train` before any step runs, with one `error:` line and nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.errors import UserError
from gptsan.train.cli import main
from gptsan.train.loop import read_ignore_list
from tests.train_support import counting_corpus, write_mini_parameters, write_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(tmp_path):
    write_records(tmp_path / "good.tfrecord", counting_corpus(8, 16, 128))
    return tmp_path


def call(capsys, *args) -> tuple[int, list[str]]:
    status = main(list(args))
    return status, capsys.readouterr().err.strip().splitlines()


def test_records_of_the_wrong_length(inputs, capsys):
    write_records(inputs / "short.tfrecord", counting_corpus(4, 12, 128))
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "short.tfrecord"), "--parameter_file",
                       str(parameters))
    assert status == 2 and err == [f"error: {inputs / 'short.tfrecord'}: record 0 has 12 tokens but the "
                                   "model's num_contexts is 16 (encode the corpus with --num_context 16)"]
    assert not (inputs / "out").exists()


def test_records_from_another_vocabulary(inputs, capsys):
    """Ids past num_vocabulary used to train on silently (NaN losses, exit 0)."""
    corpus = counting_corpus(8, 16, 128, period=200)
    write_records(inputs / "wide.tfrecord", corpus)
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "wide.tfrecord"), "--parameter_file",
                       str(parameters))
    first = int(max(corpus["x"][0].max(), corpus["y"][0].max()))
    assert first >= 128
    assert status == 2 and err == [f"error: {inputs / 'wide.tfrecord'}: record 0 has token id {first} but the "
                                   "model's num_vocabulary is 128 (was the corpus encoded with another vocabulary?)"]
    assert not (inputs / "out").exists()


def test_input_files_without_records(inputs, capsys):
    """An empty tfrecord file used to end in a StopIteration traceback."""
    (inputs / "empty.tfrecord").write_bytes(b"")
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "empty.tfrecord"), "--parameter_file", str(parameters))
    assert status == 2 and err == [f"error: --input_files {inputs / 'empty.tfrecord'}: 0 records in "
                                   f"{inputs / 'empty.tfrecord'}, expected at least 1"]
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("count, counted", [(3, "3 records"), (1, "1 record")])
def test_eval_files_with_less_than_one_batch(inputs, capsys, count, counted):
    """Evaluation reads each record once, so it needs a batch (8 here); 3 records used to end in a StopIteration
    traceback (and, past the first check, in evaluations that never logged anything)."""
    write_records(inputs / "eval.tfrecord", counting_corpus(count, 16, 128))
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters),
                       "--eval_files", str(inputs / "eval.tfrecord"))
    assert status == 2 and err == [f"error: --eval_files {inputs / 'eval.tfrecord'}: {counted} in "
                                   f"{inputs / 'eval.tfrecord'}, expected at least 8 (one batch)"]
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("flag", ["--input_files", "--eval_files"])
def test_a_glob_matching_nothing_names_its_flag(inputs, capsys, flag):
    """Both said `error: nothing/*.tfrecord: no tfrecord file matches`: which flag was it?"""
    files = {"--input_files": str(inputs / "good.tfrecord"), flag: str(inputs / "nothing" / "*.tfrecord")}
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--parameter_file", str(parameters), *(part for item in files.items() for part in item))
    assert status == 2 and err == [f"error: {flag} {inputs / 'nothing' / '*.tfrecord'}: no tfrecord file matches"]
    assert not (inputs / "out").exists()


def test_an_output_dir_that_is_a_file(inputs, capsys):
    (inputs / "afile").write_text("notes")
    parameters = write_mini_parameters(inputs / "model", inputs / "afile")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters))
    assert status == 2 and err == [f"error: train_params.output_dir {inputs / 'afile'}: is a file; give a folder"]
    assert (inputs / "afile").read_text() == "notes"


def test_half_onehot_with_a_one_wide_spout_is_refused(inputs, capsys):
    """Half of num_spout 1 is no class: every spout vector was noise, trained without a word."""
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    data = json.loads(parameters.read_text())
    data["model_params"]["num_spout"] = 1
    parameters.write_text(json.dumps(data))
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters),
                       "--spout_vector", "half_onehot")
    assert status == 2 and err == ["error: --spout_vector half_onehot: the model's num_spout 1 leaves no classes "
                                   "(half of it); give onehot, or convert the model with gptsan-convert --num_spout "
                                   "2 or more"]
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--accumulate_steps", "3"], "error: --accumulate_steps 3: must be a positive divisor of the batch size 8"),
    (["--accumulate_steps", "0"], "error: --accumulate_steps 0: must be a positive divisor of the batch size 8"),
    (["--expert_parallelism", "0"], "error: --expert_parallelism 0: expected a positive divisor of the 8 devices"),
    (["--expert_parallelism", "3"], "error: --expert_parallelism 3: expected a positive divisor of the 8 devices"),
    (["--eval_batches", "-1"], "error: --eval_batches: expected a positive count, got -1"),
    (["--log_every", "0"], "error: --log_every: expected a positive count, got 0"),
    (["--optimizer", "adamw_cosine", "--max_training_step", "2"],
     "error: --optimizer adamw_cosine: --max_training_step 2 leaves no steps for the cosine after "
     "train_params.num_warmup_steps 10"),
    (["--expert_parallelism", "4"],
     "error: --expert_parallelism 4: an expert axis of 4 devices must divide the model's 2 experts"),
])
def test_bad_run_flags_stop_before_the_output_dir_is_made(inputs, capsys, flags, expected):
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file",
                       str(parameters), *flags)
    assert status == 2 and err == [expected]
    assert not (inputs / "out").exists()


def test_a_batch_the_devices_do_not_split_evenly_stops_before_the_output_dir_is_made(inputs, capsys):
    """batch_size 12 over 8 devices (the suite's simulated mesh: data 8) used to reach the first step and end in
    jax's IndivisibleError traceback, leaving output_dir with parameters.json and TensorBoard files."""
    parameters = write_mini_parameters(inputs / "model", inputs / "out", batch_size=12)
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters))
    assert status == 2 and err == [f"error: {parameters}: train_params.batch_size 12: must be a multiple of 8, the "
                                   "devices of the data (8) and expert (1) axes that split the batch"]
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("field, value, expected", [
    ("num_warmup_steps", 2**31, "must be an integer from 0 to 2147483647, got 2147483648"),
    ("base_lr", 1e39, "must be a positive float32 number, got 1e+39"),
])
def test_train_params_past_what_the_step_holds_stop_before_the_output_dir_is_made(inputs, capsys, field, value,
                                                                                   expected):
    """num_warmup_steps of 2**31 ended in jax's OverflowError traceback with output_dir made; a base_lr of 1e39
    was trained with as float32 infinity."""
    parameters = write_mini_parameters(inputs / "model", inputs / "out", **{field: value})
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters))
    assert status == 2 and err == [f"error: {parameters}: train_params.{field} {expected}"]
    assert not (inputs / "out").exists()


def test_an_ignore_list_that_is_not_utf8_is_one_error(inputs):
    from tests.train_support import mini_config

    binary = inputs / "ignore.json"
    binary.write_bytes(b"\xff\xfe[]")  # was a UnicodeDecodeError traceback
    with pytest.raises(UserError, match=r"ignore.json: not UTF-8 text \(invalid start byte at byte 0\)$"):
        read_ignore_list(str(binary), mini_config())


def test_an_ignore_list_of_every_parameter_is_a_warning(inputs, capsys):
    from gptsan.model.params import expected_shapes
    from gptsan.train.loop import read_ignore_list
    from tests.train_support import mini_config

    config = mini_config()
    every = inputs / "every.json"
    every.write_text(json.dumps(sorted(expected_shapes(config))))
    assert read_ignore_list(str(every), config) == frozenset(expected_shapes(config))
    assert capsys.readouterr().err == f"warning: {every}: lists every parameter, so training will change nothing\n"
    some = inputs / "some.json"
    some.write_text(json.dumps(sorted(expected_shapes(config))[1:]))
    read_ignore_list(str(some), config)
    assert capsys.readouterr().err == ""


def test_missing_parameter_file_keys(inputs, capsys):
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    data = json.loads(parameters.read_text())
    del data["train_params"]["batch_size"], data["model_params"]["num_hidden"]
    parameters.write_text(json.dumps(data))
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file",
                       str(parameters))
    assert status == 2 and err == [f"error: {parameters}: model_params lacks num_hidden"]
    data["model_params"]["num_hidden"] = 32
    parameters.write_text(json.dumps(data))
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file",
                       str(parameters))
    assert status == 2 and err == [f"error: {parameters}: train_params lacks batch_size"]
    assert not (inputs / "out").exists()


def test_unwritable_output_dir(inputs, capsys):
    (inputs / "a-file").write_text("not a folder")
    parameters = write_mini_parameters(inputs / "model", inputs / "a-file" / "out")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file",
                       str(parameters))
    assert status == 2 and len(err) == 1
    out = inputs / "a-file" / "out"
    assert err[0].startswith(f"error: train_params.output_dir {out}: cannot write there")


def test_both_precisions_at_once(inputs, capsys):
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file",
                       str(parameters), "--use_bfloat16", "--use_mixed_precision")
    assert status == 2 and err == ["error: --use_bfloat16 and --use_mixed_precision: choose one "
                                   "(bfloat16 or float16 compute)"]


def test_ignore_list_with_unknown_names_exits_nonzero_with_one_line(inputs):
    """As a process: exit status 2, exactly one `error:` line and nothing else, no output folder."""
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    ignore = inputs / "ignore-params.json"
    ignore.write_text(json.dumps(["model/wte", "model/moe7/wi/kernel"]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_training.py"), "--input_files", str(inputs / "good.tfrecord"),
         "--parameter_file", str(parameters), "--ignore_parameters", str(ignore)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    # nothing else on stderr: no traceback, no TensorFlow start-up lines (gptsan/tf_runtime.py)
    assert result.stderr.splitlines() == [f"error: {ignore}: names no parameter of this model: model/moe7/wi/kernel"]
    assert not (inputs / "out").exists()


def test_vocabulary_size_counts_ids_not_a_final_newline(tmp_path):
    from gptsan.tokenizer import vocabulary_size

    (tmp_path / "v.txt").write_text("<|endoftext|>\n猫\n,\n犬,いぬ\n", encoding="utf-8")  # 4 ids, a final newline
    (tmp_path / "w.txt").write_text("<|endoftext|>\n猫\n,\n犬,いぬ", encoding="utf-8")  # the same ids, none
    assert vocabulary_size(str(tmp_path / "v.txt")) == vocabulary_size(str(tmp_path / "w.txt")) == 4


def test_a_starting_model_that_does_not_load_leaves_no_output_dir(inputs, capsys):
    """The parameters.json beside `params/` was edited (num_hidden 64): the model is refused, and the new
    output_dir used to be left holding parameters.json and the lock file."""
    from gptsan.checkpoint import native
    from gptsan.model import flatten, init_params
    from tests.train_support import MINI_MODEL_PARAMS, mini_config

    config = mini_config()
    native.save(str(inputs / "model"), config, flatten(init_params(config, 0)))
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    data = json.loads(parameters.read_text())
    data["model_params"] = {**MINI_MODEL_PARAMS, "num_hidden": 2 * MINI_MODEL_PARAMS["num_hidden"]}
    parameters.write_text(json.dumps(data))
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters))
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {inputs / 'model'}")
    assert not (inputs / "out").exists()


def test_a_corrupt_record_before_the_first_step_leaves_no_output_dir(inputs, capsys):
    """The start-up check reads one batch; the reader, filling its shuffle buffer, meets the corrupt record
    before the first step. parameters.json, tb/ and the lock file used to stay in the new output_dir."""
    corrupt = write_records(inputs / "corrupt.tfrecord", counting_corpus(30, 16, 128))
    corrupt.write_bytes(corrupt.read_bytes()[:-40])
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", str(corrupt), "--parameter_file", str(parameters), "--no_progress")
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {corrupt}: record 29 is corrupt")
    assert err[0].endswith("the run stopped before its first step (mend or remove the file, then run the same "
                           "command to go on)")
    assert not (inputs / "out").exists()


def test_an_output_dir_under_the_home_folder_is_one_folder(inputs, capsys, monkeypatch):
    """`output_dir: "~/run"`: parameters.json went to the home folder (fsspec expands ~), the checkpoints, the
    metrics and the lock to ./~/run (Orbax and the lock take it literally)."""
    monkeypatch.setenv("HOME", str(inputs / "home"))
    monkeypatch.chdir(inputs)
    parameters = write_mini_parameters(inputs / "model", "~/run")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters),
                       "--max_training_step", "1", "--no_progress")
    assert status == 0 and err[-1].endswith(f"; step 1 saved in {inputs / 'home' / 'run'}")
    assert not (inputs / "~").exists()
    assert {"parameters.json", "metrics.jsonl", "1"} <= {path.name for path in (inputs / "home" / "run").iterdir()}


def test_an_output_dir_orbax_cannot_save_in_stops_before_anything_is_written(inputs, capsys):
    """Orbax globs the folder it saves in, where `out[1]` matches `out1`: training said `step 1 saved` and left a
    checkpoint without its manifest, which nothing could read."""
    parameters = write_mini_parameters(inputs / "model", inputs / "out[1]")
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters),
                       "--max_training_step", "1", "--no_progress")
    assert status == 2 and err == [f"error: train_params.output_dir {inputs / 'out[1]'}: a path with '[' is not "
                                   "supported (Orbax saves unreadable checkpoints under it); give one without '['"]
    assert not (inputs / "out[1]").exists()


def test_a_num_pallarelizm_the_devices_cannot_hold_trains_on_the_largest_model_axis_they_can(inputs, capsys):
    """The release parameters.json's num_pallarelizm 8 on one GPU stopped with `error: mesh: 1 devices cannot be
    split into expert 1 x model 8`, while gptsan-plan planned it on a model axis of 1. Here 12 on the suite's 8
    devices: a model axis of 4 (data 2), as plan says, with a warning."""
    from gptsan.plan import plan
    from tests.train_support import MINI_MODEL_PARAMS, MINI_TRAIN_PARAMS

    parameters = inputs / "model" / "parameters.json"
    parameters.parent.mkdir()
    parameters.write_text(json.dumps({"model_params": {**MINI_MODEL_PARAMS, "num_pallarelizm": 12},
                                      "train_params": {**MINI_TRAIN_PARAMS, "output_dir": str(inputs / "out")}}))
    status, err = call(capsys, "--input_files", str(inputs / "good.tfrecord"), "--parameter_file", str(parameters),
                       "--max_training_step", "1", "--no_progress")
    assert status == 0 and err[0] == (f"warning: {parameters}: model_params.num_pallarelizm 12: the 8 devices cannot "
                                      "be split into a model axis of 12, so it is 4 (the same model, split over "
                                      "fewer devices)")
    assert err[-1].endswith(f"; step 1 saved in {inputs / 'out'}")
    assert plan(str(parameters), 8, activations=False)["mesh"] == {"data": 2, "expert": 1, "model": 4}


@pytest.mark.parametrize("variable, value", [("GPTSAN_NUM_PROCESSES", "abc"), ("GPTSAN_PROCESS_ID", "")])
def test_a_process_count_or_id_in_the_environment_that_is_not_an_integer_is_one_error(capsys, monkeypatch,
                                                                                     variable, value):
    """They are the defaults of --num_processes and --process_id: a ValueError traceback from every call."""
    monkeypatch.setenv(variable, value)
    assert call(capsys, "--help") == (2, [f"error: ${variable}: expected an integer, got {value!r}"])


def test_an_empty_input_files_names_the_flag(inputs, capsys):
    parameters = write_mini_parameters(inputs / "model", inputs / "out")
    status, err = call(capsys, "--input_files", "", "--parameter_file", str(parameters))
    assert status == 2 and err == ["error: --input_files: empty; give a glob of tfrecord files"]  # was ": no ..."
    assert not (inputs / "out").exists()
