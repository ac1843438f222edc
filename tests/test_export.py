"""gptsan-export: HF and original TF exports load back to identical parameters; transformers 4.40 agrees."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptsan.checkpoint import detect_format, load_flat
from gptsan.convert.cli import main as convert_main
from gptsan.convert.export import main as export_main
from gptsan.logits_cli import compute_logits
from gptsan.model import unflatten


@pytest.fixture(scope="module")
def extended_model(tmp_path_factory, tiny_tf_dir):
    """A native model with new (random) layers: the fixture plus 2 extended layers."""
    dst = tmp_path_factory.mktemp("export") / "native"
    args = ["--checkpoint", str(tiny_tf_dir), "--output", str(dst), "--add_extra_stage", "2"]
    assert convert_main(args) == 0
    return dst


@pytest.fixture(scope="module")
def exports(extended_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("hf", "gptsan-tf"):
        args = ["--model", str(extended_model), "--format", fmt, "--output", str(root / fmt)]
        assert export_main(args) == 0
    return root


@pytest.mark.parametrize("fmt", ["hf", "gptsan-tf"])
def test_export_loads_back_to_identical_parameters(extended_model, exports, fmt):
    config, flat = load_flat(str(extended_model))
    assert detect_format(str(exports / fmt)) == fmt
    config2, flat2 = load_flat(str(exports / fmt))
    assert config2 == config
    assert sorted(flat2) == sorted(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(flat2[name], value, err_msg=name)


def test_tf_export_is_an_original_style_checkpoint(extended_model, exports):
    import tensorflow as tf

    _, flat = load_flat(str(extended_model))
    out = exports / "gptsan-tf"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model.data-00000-of-00001", "model.index",
                                                     "parameters.json"]
    assert tf.train.latest_checkpoint(str(out)) == str(out / "model")
    variables = tf.train.load_checkpoint(str(out)).get_variable_to_shape_map()
    assert {name: tuple(shape) for name, shape in variables.items()} == {k: v.shape for k, v in flat.items()}
    parameters = json.loads((out / "parameters.json").read_text())
    source = json.loads((extended_model / "parameters.json").read_text())
    assert parameters["model_params"] == source["model_params"]
    # train_params come along, with output_dir the export (training from it used to write into the source's)
    assert parameters["train_params"] == {**source["train_params"], "output_dir": str(out)}


def test_hf_export_config(exports, tiny_hf_dir):
    hf_config = json.loads((exports / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "gptsan-japanese"
    assert (hf_config["num_switch_layers"], hf_config["num_ext_layers"], hf_config["d_spout"]) == (2, 4, 16)
    assert hf_config["torch_dtype"] == "float32"
    # the port's special tokens, as its own files have them (pad is <|separator|>, V - 5; it was <|nottoken|>)
    port = json.loads((tiny_hf_dir / "config.json").read_text())
    tokens = ("pad_token_id", "separator_token_id", "eos_token_id")
    assert {key: hf_config[key] for key in tokens} == {key: port[key] for key in tokens}


def test_float16_hf_export_loads_as_rounded_float32(extended_model, tmp_path):
    out = tmp_path / "hf16"
    assert export_main(["--model", str(extended_model), "--format", "hf", "--output", str(out),
                        "--dtype", "float16"]) == 0
    _, flat = load_flat(str(extended_model))
    _, flat16 = load_flat(str(out))
    for name, value in flat.items():
        np.testing.assert_array_equal(flat16[name], value.astype(np.float16).astype(np.float32), err_msg=name)


@pytest.fixture
def model_with_weight(tmp_path, tiny_tf_dir):
    """A native copy of the fixture whose `model/dense/kernel` holds the given values in its first row."""
    from gptsan.checkpoint import native

    def make(*values: float):
        config, flat = load_flat(str(tiny_tf_dir))
        kernel = flat["model/dense/kernel"].copy()
        kernel[0, : len(values)] = values
        train_params = json.loads((tiny_tf_dir / "parameters.json").read_text())["train_params"]
        native.save(str(tmp_path / "model"), config, {**flat, "model/dense/kernel": kernel}, train_params)
        return tmp_path / "model"

    return make


def test_a_float16_export_of_values_beyond_its_range_is_refused(tmp_path, model_with_weight, capsys):
    """A weight of -1e5 was written as -inf (float16 ends at 65504), with only numpy's RuntimeWarning."""
    model = model_with_weight(0.5, -1e5)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "exports" / "hf"
    assert export_main(["--model", str(model), "--format", "hf", "--output", str(out), "--dtype", "float16"]) == 2
    assert capsys.readouterr().err == (
        "error: --dtype float16: model/dense/kernel holds values up to 100000 in magnitude, beyond float16's "
        "maximum 65504 (they would be stored as inf); export in bfloat16 or float32\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder, no parent folder


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_tf_export_in_another_dtype_than_float32_is_refused(tmp_path, extended_model, capsys, dtype):
    """It was written (every variable half or bfloat16), and the original's trainer, restoring float32 variables,
    refused it: "expected dtype float does not equal original dtype half"."""
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "exports" / "tf"
    assert export_main(["--model", str(extended_model), "--format", "gptsan-tf", "--output", str(out),
                        "--dtype", dtype]) == 2
    assert capsys.readouterr().err == (
        f"error: --dtype {dtype}: --format gptsan-tf writes float32, as the original's variables are (its trainer "
        "cannot restore another dtype); use --format hf for a smaller copy\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_float16_export_of_values_that_only_round_is_written(tmp_path, model_with_weight):
    """65519 rounds to float16's 65504 and 1e-9 to 0: precision lost, no overflow, so no refusal."""
    from safetensors.numpy import load_file

    model = model_with_weight(65519.0, -65519.0, 1e-9, 3.14159)
    out = tmp_path / "hf16"
    assert export_main(["--model", str(model), "--format", "hf", "--output", str(out), "--dtype", "float16"]) == 0
    _, flat = load_flat(str(model))
    stored = load_file(out / "model.safetensors")["model.last_project.weight"]  # the kernel, transposed
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.T, flat["model/dense/kernel"].astype(np.float16), rtol=0, atol=0)
    assert stored[:4, 0].tolist() == [65504.0, -65504.0, 0.0, np.float16(3.14159)]


PEER_INSTALLED = all(importlib.util.find_spec(name) for name in ("torch", "transformers"))


@pytest.mark.skipif(not PEER_INSTALLED, reason="needs the [peer] extra (torch, transformers 4.40)")
def test_transformers_loads_the_hf_export_and_agrees(extended_model, exports, tiny_cases):
    import torch
    from transformers import GPTSanJapaneseForConditionalGeneration

    model, info = GPTSanJapaneseForConditionalGeneration.from_pretrained(str(exports / "hf"),
                                                                         output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    model.eval()
    config, flat = load_flat(str(extended_model))
    ids = tiny_cases["input_ids"]
    with torch.no_grad():
        for spout in (None, tiny_cases["spout"]):
            kwargs = {} if spout is None else {"spout": torch.from_numpy(spout)}
            mask = torch.ones(ids.shape, dtype=torch.long)  # the HF port's spout path needs a mask
            theirs = model(input_ids=torch.from_numpy(ids), attention_mask=mask, **kwargs).logits.numpy()
            ours = compute_logits(config, unflatten(flat), ids, spout=spout)
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["existing", "empty", "bad_model", "bad_format"])
def test_bad_exports_fail_and_write_nothing(tmp_path, extended_model, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = "" if case == "empty" else tmp_path / "out"
    model = tmp_path / "nowhere" if case == "bad_model" else extended_model
    fmt = "onnx" if case == "bad_format" else "hf"
    if case == "existing":
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    if case == "bad_format":
        with pytest.raises(SystemExit) as caught:  # argparse: usage line and exit status 2
            export_main(["--model", str(model), "--format", fmt, "--output", str(out)])
        assert caught.value.code == 2
    else:
        assert export_main(["--model", str(model), "--format", fmt, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        expected = {"existing": "already exists",
                    "empty": "--output: expected the path of a new folder, got an empty one"}
        assert expected.get(case, "not found") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_source_train_params_that_is_not_an_object_is_one_error_line(tmp_path, extended_model, capsys):
    """It stopped the gptsan-tf export with a ValueError traceback (after writing the checkpoint to a temp)."""
    model = tmp_path / "model"
    shutil.copytree(extended_model, model)
    parameters = json.loads((model / "parameters.json").read_text())
    (model / "parameters.json").write_text(json.dumps({**parameters, "train_params": "x"}))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main(["--model", str(model), "--format", "gptsan-tf", "--output", str(tmp_path / "out")]) == 2
    message = "train_params must be a JSON object, got \"x\""
    assert capsys.readouterr().err == f"error: {model / 'parameters.json'}: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    hf_args = ["--model", str(model), "--format", "hf", "--output", str(tmp_path / "hf")]
    assert export_main(hf_args) == 0  # an HF folder has no train_params


@pytest.mark.skipif(not PEER_INSTALLED, reason="needs the [peer] extra (torch, transformers 4.40)")
def test_transformers_drops_no_token_of_a_long_input(tmp_path):
    """The HF config said expert_capacity 128: HF dropped every token past the 128th routed to an expert in a
    row, which gptsan's default (dropless) routing keeps, so a 1280-token GPTSAN input gave other logits there."""
    import torch
    from transformers import GPTSanJapaneseForConditionalGeneration

    from gptsan.checkpoint import native
    from gptsan.model import ModelConfig, flatten, init_params

    config = ModelConfig(num_contexts=160, num_switch_layers=1, num_ext_layers=0, num_hidden=16, num_header=2,
                         num_experts=1, num_vocabulary=32, num_spout=4)  # one expert: every token goes there
    flat = {name: np.asarray(value) for name, value in flatten(init_params(config, 0)).items()}
    native.save(str(tmp_path / "native"), config, flat)
    assert export_main(["--model", str(tmp_path / "native"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["expert_capacity"] >= 160
    model = GPTSanJapaneseForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    ids = np.random.default_rng(0).integers(0, 28, (1, 160))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
    ours = compute_logits(config, unflatten(flat), ids)
    np.testing.assert_allclose(theirs.logits.numpy(), ours, rtol=0, atol=1e-4)


# The export, run with writes past 100 kB failing with EFBIG ("File too large"), as a full disk fails a write.
EXPORT_WITH_FILES_OF_AT_MOST_100_KB = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.argv = ["gptsan-export", *sys.argv[1:]]
runpy.run_module("gptsan.convert.export", run_name="__main__")
"""


@pytest.mark.parametrize("fmt", ["hf", "gptsan-tf"])
def test_an_export_onto_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, extended_model, fmt):
    """A full disk gave a traceback: fsspec's write error names no file (hf), and TensorFlow's is no OSError at all
    (gptsan-tf), after two lines of TensorFlow's C++ logging (JAX had set TF_CPP_MIN_LOG_LEVEL to 1)."""
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    result = subprocess.run([sys.executable, "-c", EXPORT_WITH_FILES_OF_AT_MOST_100_KB, "--model", str(extended_model),
                             "--format", fmt, "--output", str(out)],
                            env={**env, "PYTHONPATH": str(Path(__file__).parents[1])}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    reason = "File too large" if fmt == "hf" else "cannot write the TF checkpoint: File too large"
    assert result.stderr == f"error: --output {out}: {reason}\n"
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder
