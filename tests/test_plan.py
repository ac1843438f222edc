"""`gptsan-plan` for the GPTSAN-2.8B and 3B-finetune configs matches a hand count of parameters and bytes;
the step estimate is XLA's memory analysis, which gradient accumulation shrinks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.plan import GiB, main, plan

ROOT = Path(__file__).resolve().parents[1]
D, HEADS, EXPERTS, VOCAB, CTX, SPOUT, SWITCH = 1024, 16, 16, 36000, 1280, 128, 10


def hand_count(extended: int) -> dict:
    """GPTSAN's parameters by name (see gptsan/model/params.py), and what 8-way model parallelism splits:
    attention heads (qkv, o), the experts' and extended layers' FFN widths (wi, wo, p1, p1 bias, p2) and the
    vocabulary (wte, wob)."""
    layers = SWITCH + extended
    attention = 3 * D * D + D * D  # qkv [d, 3, H, dh], o [H, dh, d]; no biases
    norms = 2 * 2 * D  # an{l}, ln{l}: g and b
    switch_split = 2 * EXPERTS * D * 8 * D  # wi [E, d, 8d], wo [E, 8d, d]
    switch_whole = D * EXPERTS + D * D  # switch_gating [d, E], softmlp [d, d]
    ext_split = D * 4 * D + 4 * D + 4 * D * D  # p1 kernel and bias, p2 kernel
    ext_whole = D  # p2 bias
    vocabulary = VOCAB * D + VOCAB  # wte, wob
    positions = CTX * D + (CTX * D if extended else 0)  # wpe, ete
    head = D * D + D  # dense kernel, dense_1 bias
    spout = 8 * SPOUT * SPOUT + SPOUT * 2 * layers * D  # pasts/mlp0..7, pasts/out
    split = layers * attention + SWITCH * switch_split + extended * ext_split + vocabulary
    whole = layers * norms + SWITCH * switch_whole + extended * ext_whole + positions + head + spout
    trainable_ext = extended * (attention + norms + ext_split + ext_whole) + (CTX * D if extended else 0) + spout
    trainable_ext_bytes = 4 * (extended * (attention // 8 + norms + ext_split // 8 + ext_whole)
                               + (CTX * D if extended else 0) + spout)
    return {"parameters": split + whole, "parameter_bytes": 4 * (split // 8 + whole),
            "extended_trainable": trainable_ext, "extended_trainable_bytes": trainable_ext_bytes}


def run_plan(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "gptsan.plan", *args, "--json"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("name, extended", [("gptsan-2.8b", 0), ("gptsan-3b-finetune", 14)])
def test_parameters_and_bytes_match_a_hand_count(name, extended):
    hand = hand_count(extended)
    config = str(ROOT / "configs" / f"{name}.json")
    everything = run_plan("--parameter_file", config, "--devices", "8", "--skip_activations")
    assert everything["mesh"] == {"data": 1, "expert": 1, "model": 8}  # model axis = num_pallarelizm
    assert everything["parameters"] == everything["trainable"] == hand["parameters"]
    assert everything["parameter_bytes"] == pytest.approx(hand["parameter_bytes"], rel=0.01)
    assert everything["optimizer_bytes"] == pytest.approx(2 * hand["parameter_bytes"], rel=0.01)
    if extended:
        finetune = run_plan("--parameter_file", config, "--devices", "8", "--skip_activations",
                            "--trainable", "extended")
        assert finetune["trainable"] == hand["extended_trainable"]
        assert finetune["optimizer_bytes"] == pytest.approx(2 * hand["extended_trainable_bytes"], rel=0.01)
    print(name, everything["parameters"], everything["parameter_bytes"] / GiB, "GiB per device")


def test_the_2_8b_model_counts_2_78_billion_and_fits_a_v3_core_for_parameters_and_adam():
    report = plan(str(ROOT / "configs" / "gptsan-2.8b.json"), 8, activations=False)
    assert report["parameters"] == 2_779_000_992
    assert report["total_bytes"] == 3 * report["parameter_bytes"]
    assert report["fits"]["TPU v3 core"]  # 4.0 GiB of parameters and Adam slots per core


def test_step_estimate_is_xla_memory_analysis_and_accumulation_shrinks_it(tmp_path):
    parameters = tmp_path / "parameters.json"
    from tests.train_support import MINI_MODEL_PARAMS

    parameters.write_text(json.dumps({"model_params": MINI_MODEL_PARAMS, "train_params": {"batch_size": 32}}))
    whole = plan(str(parameters), 8, mesh="4,2,1")
    accumulated = plan(str(parameters), 8, mesh="4,2,1", accumulate_steps=4)
    assert whole["step_temporary_bytes"] > 0
    assert accumulated["step_temporary_bytes"] < whole["step_temporary_bytes"]
    assert whole["total_bytes"] == whole["parameter_bytes"] + whole["optimizer_bytes"] + \
        whole["step_temporary_bytes"]


def test_bad_mesh_is_a_user_error(capsys):
    config = str(ROOT / "configs" / "gptsan-2.8b.json")
    assert main(["--parameter_file", config, "--devices", "8", "--mesh", "2,2,1", "--skip_activations"]) == 2
    assert capsys.readouterr().err.strip() == "error: --mesh: 2,2,1 is 4 devices, but --devices is 8"
    assert main(["--parameter_file", config, "--devices", "32", "--mesh", "1,32,1", "--skip_activations"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --mesh 1,32,1: an expert axis of 32 devices must divide the "
                                               "model's 16 experts")


def test_a_mesh_training_would_not_take_is_said(capsys):
    """--mesh 1,1,32 planned 0.78 GiB of parameters a device where training (num_pallarelizm 8) holds 1.45."""
    config = str(ROOT / "configs" / "gptsan-3b-finetune.json")
    assert main(["--parameter_file", config, "--devices", "32", "--mesh", "1,1,32", "--skip_activations"]) == 0
    assert capsys.readouterr().err == ("warning: --mesh 1,1,32: gptsan-train takes a model axis of 8 here "
                                       "(model_params.num_pallarelizm 8 as far as 32 devices allow), not 32; set "
                                       "num_pallarelizm to 32 to train as planned\n")
    assert main(["--parameter_file", config, "--devices", "32", "--mesh", "4,1,8", "--skip_activations"]) == 0
    assert capsys.readouterr().err == ""


def test_a_trainable_that_is_neither_a_choice_nor_a_file_names_the_flag(capsys):
    """A typo of `extended` was `error: extend: ignore-parameters file not found`."""
    config = str(ROOT / "configs" / "tiny.json")
    assert main(["--parameter_file", config, "--devices", "1", "--trainable", "extend", "--skip_activations"]) == 2
    expected = "error: --trainable extend: expected all, extended or an ignore-params.json file\n"
    assert capsys.readouterr().err == expected


def mini_parameter_file(tmp_path, train_params) -> str:
    from tests.train_support import MINI_MODEL_PARAMS  # 2 experts

    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"model_params": MINI_MODEL_PARAMS, "train_params": train_params}))
    return str(path)


SPLIT_BY_2 = "must be a multiple of 2, the devices of the data (2) and expert (1) axes that split the batch"


@pytest.mark.parametrize("train_params, args, message", [
    ({"batch_size": 8}, ["--batch", "0"], "--batch: expected a positive count, got 0"),
    ({"batch_size": 8}, ["--batch", "-3"], "--batch: expected a positive count, got -3"),
    ({"batch_size": 8}, ["--devices", "2", "--batch", "3"], f"--batch 3: {SPLIT_BY_2}"),
    ({"batch_size": 8}, ["--devices", "4", "--batch", "2"],
     "--batch 2: must be a multiple of 4, the devices of the data (4) and expert (1) axes that split the batch"),
    ({"batch_size": 8}, ["--devices", "2", "--mesh", "1,2,1", "--batch", "1"],
     "--batch 1: must be a multiple of 2, the devices of the data (1) and expert (2) axes that split the batch"),
    ({"batch_size": 8}, ["--batch", "2", "--accumulate_steps", "3"],
     "--accumulate_steps 3: must be a positive divisor of the batch size 2"),
    ({"batch_size": 3}, ["--devices", "2"], f"{{file}}: train_params.batch_size 3: {SPLIT_BY_2}"),
    ({"batch_size": -4}, [], "{file}: train_params.batch_size must be a positive integer, got -4"),
    ({"batch_size": "abc"}, [], "{file}: train_params.batch_size must be a positive integer, got \"abc\""),
    ({"batch_size": 8, "base_lr": 0}, [], "{file}: train_params.base_lr must be a positive float32 number, got 0"),
    ("x", [], "{file}: train_params must be a JSON object, got \"x\""),
])
@pytest.mark.parametrize("skip_activations", [True, False])
def test_impossible_batches_and_bad_train_params_are_one_error_line(tmp_path, capsys, train_params, args, message,
                                                                     skip_activations):
    """Each used to run on (--batch 0: train_params.batch_size instead; -3 and batches the data axis does not
    split: "fits" with --skip_activations) or stop with a stack trace, before the step was compiled."""
    file = mini_parameter_file(tmp_path, train_params)
    flags = ["--parameter_file", file, "--devices", "1", *args] + (["--skip_activations"] if skip_activations else [])
    assert main(flags) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {message.format(file=file)}\n"


def test_a_batch_the_devices_do_not_split_is_refused_by_the_console_script(tmp_path):
    """Without --skip_activations this was jax's IndivisibleError traceback (exit 1), from the compile."""
    file = mini_parameter_file(tmp_path, {"batch_size": 8})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "gptsan.plan", "--parameter_file", file, "--devices", "2",
                             "--batch", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: --batch 3: {SPLIT_BY_2}\n")


def test_batch_defaults_to_train_params_then_to_one_row_per_splitting_device(tmp_path):
    assert plan(mini_parameter_file(tmp_path, {"batch_size": 6}), 2, activations=False)["batch"] == 6
    assert plan(mini_parameter_file(tmp_path, {}), 4, mesh="2,2,1", activations=False)["batch"] == 4
    assert plan(mini_parameter_file(tmp_path, {"batch_size": 6}), 2, batch=4, activations=False)["batch"] == 4


def test_the_originals_parameter_file_plans_with_vocabulary(tmp_path, capsys):
    """The original's parameters.json has no num_vocabulary (its tools read the vocabulary): gptsan-plan refused
    it ('model_params lacks num_vocabulary') where gptsan-train takes it with --vocabulary."""
    from tests.conftest import shared_path

    original = json.loads((ROOT / "configs" / "gptsan-2.8b.json").read_text())
    del original["model_params"]["num_vocabulary"]
    path = tmp_path / "train_params.json"
    path.write_text(json.dumps(original))
    assert main(["--parameter_file", str(path), "--devices", "8", "--skip_activations"]) == 2
    assert capsys.readouterr().err == f"error: {path}: model_params lacks num_vocabulary\n"
    vocabulary = str(shared_path("vocab", "ja-swe36k.txt"))
    report = plan(str(path), 8, activations=False, vocabulary=vocabulary)
    assert report["parameters"] == 2_779_000_992  # the release's, with its 36,000-token vocabulary
    original["model_params"]["num_vocabulary"] = 32000
    path.write_text(json.dumps(original))
    assert main(["--parameter_file", str(path), "--devices", "8", "--skip_activations", "--vocabulary",
                 vocabulary]) == 2
    assert capsys.readouterr().err == (f"error: --vocabulary: {vocabulary} has 36000 ids, but "
                                       "model_params.num_vocabulary is 32000\n")
