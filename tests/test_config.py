"""parameters.json is read into a validated ModelConfig."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.errors import UserError
from gptsan.model import ModelConfig, load_config
from gptsan.model.config import DEFAULT_NUM_SPOUT

BASE = {"num_contexts": 64, "num_switch_layers": 2, "num_ext_layers": 2, "num_hidden": 64, "num_header": 4,
        "num_experts": 4, "num_pallarelizm": 1, "num_spout": 16, "num_vocabulary": 512, "train_mode": "lm"}


def test_fixture_parameters_json(tiny_tf_dir):
    config = load_config(tiny_tf_dir / "parameters.json")
    assert (config.num_hidden, config.head_dim, config.num_layers, config.num_spout) == (64, 16, 4, 16)
    assert config.to_model_params() == json.loads((tiny_tf_dir / "parameters.json").read_text())["model_params"]


def test_hf_config_gives_the_same_architecture(tiny_tf_dir, tiny_hf_dir):
    from_hf = ModelConfig.from_hf_config(json.loads((tiny_hf_dir / "config.json").read_text()))
    assert from_hf == load_config(tiny_tf_dir / "parameters.json")


def test_heads_must_divide_hidden():
    with pytest.raises(UserError, match="num_hidden \\(64\\) must be divisible by num_header \\(5\\)"):
        ModelConfig.from_model_params({**BASE, "num_header": 5})


def without_num_spout(tmp_path) -> Path:
    params = dict(BASE)
    del params["num_spout"]
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"train_params": {"batch_size": 2}, "model_params": params}))
    return path


def test_missing_num_spout_defaults_to_128_with_one_warning_line(tmp_path, capsys):
    path = without_num_spout(tmp_path)
    config = load_config(path)
    assert load_config(path) == config  # read again: no second warning
    assert config.num_spout == DEFAULT_NUM_SPOUT == 128
    assert capsys.readouterr().err == f"warning: {path}: model_params.num_spout missing; using 128\n"


def test_missing_num_spout_warning_of_a_tool_is_one_line(tmp_path):
    """The line a user sees: no Python source line under it (warnings.warn printed one)."""
    path = without_num_spout(tmp_path)
    command = [sys.executable, "-m", "gptsan.plan", "--parameter_file", str(path), "--devices", "1",
               "--skip_activations", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"warning: {path}: model_params.num_spout missing; using 128\n"


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden", 0, "num_hidden must be a positive integer"),
    ("num_experts", "4", "num_experts must be a positive integer"),
    ("num_ext_layers", -1, "num_ext_layers must be a non-negative integer"),
    ("train_mode", "mask", "train_mode must be lm, hybrid or mlm"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_model_params({**BASE, key: value})


def test_missing_keys_are_listed(tmp_path):
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"model_params": {"num_hidden": 64}}))
    with pytest.raises(UserError, match="lacks num_contexts, num_switch_layers"):
        load_config(path)


def test_unreadable_parameter_file_is_named(tmp_path):
    path = tmp_path / "parameters.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="parameters.json: not valid JSON"):
        load_config(path)
    with pytest.raises(UserError, match="parameter file not found"):
        load_config(tmp_path / "missing.json")
    path.write_bytes(b"\xff{}")  # was a UnicodeDecodeError traceback
    with pytest.raises(UserError, match=r"parameters.json: not UTF-8 text \(invalid start byte at byte 0\)$"):
        load_config(path)


def test_sizes_written_as_whole_floats_are_read_as_integers():
    """config.json's sizes took 64.0 while parameters.json refused it; both read it as 64 now."""
    config = ModelConfig.from_model_params({**BASE, "num_hidden": 64.0, "num_spout": 16.0})
    assert config == ModelConfig.from_model_params(BASE)
    assert type(config.num_hidden) is int and type(config.num_spout) is int


@pytest.mark.parametrize("value, shown", [(64.5, "64.5"), (None, "null"), ("64", '"64"'), (True, "true")])
def test_a_bad_size_is_shown_as_the_file_spells_it(value, shown):
    """Messages said `got None` and `got '64'`, Python's spelling of what the JSON file holds."""
    with pytest.raises(UserError) as caught:
        ModelConfig.from_model_params({**BASE, "num_hidden": value}, "p.json")
    assert str(caught.value) == f"p.json: model_params.num_hidden must be a positive integer, got {shown}"


def test_unknown_model_params_keys_are_named_once(tmp_path, capsys):
    """A misspelt key (num_expert) was dropped without a word, leaving the setting at its default or missing."""
    path = tmp_path / "parameters.json"
    params = {**BASE, "num_expert": 8, "routing": "capacity"}
    path.write_text(json.dumps({"model_params": params}))
    config = load_config(path)
    assert load_config(path) == config == ModelConfig.from_model_params(BASE)  # the runtime choice not taken
    assert capsys.readouterr().err == (f'warning: {path}: model_params "num_expert", "routing" not read (GPTSAN\'s '
                                       "keys: num_contexts, num_switch_layers, num_ext_layers, num_hidden, "
                                       "num_header, num_experts, num_vocabulary, num_spout, num_pallarelizm, "
                                       "train_mode)\n")


def test_train_params_counts_written_as_whole_floats_are_read_as_integers():
    from gptsan.train.config import TrainParams

    values = {"output_dir": "out", "batch_size": 16.0, "base_lr": 1.0, "num_warmup_steps": 2000.0,
              "max_to_keep_save": 2, "checkpoint_per_hours": 1, "checkpoint_per_steps": 1e4}
    params = TrainParams.from_dict(values)
    assert (params.batch_size, params.num_warmup_steps, params.checkpoint_per_steps) == (16, 2000, 10000)
    assert type(params.batch_size) is type(params.checkpoint_per_steps) is int
    with pytest.raises(UserError, match=r"^parameters.json: train_params.batch_size must be a positive integer, "
                                        r"got 16.5$"):
        TrainParams.from_dict({**values, "batch_size": 16.5})
