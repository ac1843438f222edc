"""gptsan-logits: fixture logits from any checkpoint format; bad input is one `error:` line, exit 2."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptsan.checkpoint import load_flat, load_model, native
from gptsan.logits_cli import compute_logits, main

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
CASES = {  # reference logits -> the inputs that produce them
    "logits_causal": {},
    "logits_prefix": {"--num_precontext": "num_precontext"},
    "logits_spout": {"--spout": "spout"},
    "logits_spout_onehot": {"--spout": "spout_onehot"},
}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gptsan.logits_cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def write_inputs(tmp_path, tiny_cases, case):
    np.save(tmp_path / "ids.npy", tiny_cases["input_ids"])
    args = ["--ids", tmp_path / "ids.npy"]
    for flag, source in CASES[case].items():
        np.save(tmp_path / f"{source}.npy", tiny_cases[source])
        args += [flag, tmp_path / f"{source}.npy"]
    return args


@pytest.mark.parametrize("case", CASES)
def test_cli_reproduces_fixture_logits(tmp_path, tiny_hf_dir, tiny_cases, case):
    output = tmp_path / "logits.npy"
    result = run_cli("--model", tiny_hf_dir, *write_inputs(tmp_path, tiny_cases, case), "--output", output)
    assert result.returncode == 0, result.stderr
    logits = np.load(output)
    assert logits.dtype == np.float32 and logits.shape == tiny_cases[case].shape
    np.testing.assert_allclose(logits, tiny_cases[case], rtol=0, atol=TOLERANCE)


def test_tf_checkpoint_gives_the_same_logits_as_the_cli(tiny_tf_dir, tiny_cases):
    """The CLI's forward (compute_logits) on the TF fixture, every case (the subprocess runs use HF)."""
    config, params = load_model(str(tiny_tf_dir))
    for case, inputs in CASES.items():
        kwargs = {flag.lstrip("-"): tiny_cases[source] for flag, source in inputs.items()}
        logits = compute_logits(config, params, tiny_cases["input_ids"], **kwargs)
        np.testing.assert_allclose(logits, tiny_cases[case], rtol=0, atol=TOLERANCE, err_msg=case)


def truncated_copy(tiny_hf_dir, bad, fmt):
    """The tiny model as `fmt` at `bad`, its tensor data cut in half."""
    if fmt == "hf":
        shutil.copytree(tiny_hf_dir, bad)
        chunks = [bad / "model.safetensors"]
    else:  # native: every one of Orbax's OCDBT data files (the checkpoint's metadata lives in them too)
        native.save(str(bad), *load_flat(str(tiny_hf_dir)))
        chunks = list((bad / "params").rglob("d/*"))
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_cli_truncated_checkpoint_is_one_error_line(tmp_path, tiny_hf_dir, tiny_cases, fmt):
    """Also for Orbax, whose reads still in flight when it gives up used to print an 'Event loop is closed'
    traceback each after the error line (1-16 here, by timing)."""
    bad = tmp_path / "bad"
    truncated_copy(tiny_hf_dir, bad, fmt)
    output = tmp_path / "logits.npy"
    result = run_cli("--model", bad, *write_inputs(tmp_path, tiny_cases, "logits_causal"), "--output", output)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(bad) in result.stderr and "truncated or corrupt" in result.stderr
    assert not output.exists()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"ids": np.full((2, 4), 512)}, r"--ids: token ids must lie in \[0, 512\)"),
        ({"ids": np.zeros((2, 65), np.int64)}, "--ids: length 65 exceeds the model's context of 64"),
        ({"ids": np.zeros((8,), np.int64)}, r"--ids: expected integer token ids of shape \[batch, length\]"),
        ({"ids": np.zeros((2, 4), np.float32)}, "--ids: expected integer token ids"),
        ({"num_precontext": np.array([1, 2, 3])}, r"--num_precontext: expected integers of shape \[2\]"),
        ({"num_precontext": np.array([1, 9])}, r"--num_precontext: prefix lengths must lie in \[0, 4\]"),
        ({"spout": np.zeros((2, 15), np.float32)}, r"--spout: expected real numbers of shape \[2, 16\]"),
        ({"spout": np.zeros((2, 16), np.complex64)}, r"--spout: expected real numbers .*, got complex64"),
        ({"spout": np.full((2, 16), np.nan, np.float32)}, "--spout: values must be finite"),
        # finite in float64, inf in float32, as the model reads them: the logits came out all NaN, exit 0
        ({"spout": np.full((2, 16), 1e40)}, r"--spout: values must be finite in float32 \(at most 3.4e38"),
    ],
)
def test_cli_rejects_bad_inputs(tmp_path, tiny_hf_dir, capsys, inputs, message):
    arrays = {"ids": np.zeros((2, 4), np.int64), **inputs}
    args = ["--model", str(tiny_hf_dir), "--output", str(tmp_path / "logits.npy")]
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
        args += [f"--{name}", str(tmp_path / f"{name}.npy")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "logits.npy").exists()


def test_cli_missing_input_file_and_model(tmp_path, tiny_hf_dir, capsys):
    assert main(["--model", str(tiny_hf_dir), "--ids", str(tmp_path / "none.npy"), "--output",
                 str(tmp_path / "o.npy")]) == 2
    assert f"error: --ids {tmp_path / 'none.npy'}: file not found" in capsys.readouterr().err
    np.save(tmp_path / "ids.npy", np.zeros((1, 2), np.int64))
    assert main(["--model", str(tmp_path / "nomodel"), "--ids", str(tmp_path / "ids.npy"), "--output",
                 str(tmp_path / "o.npy")]) == 2
    assert "model directory not found" in capsys.readouterr().err

    (tmp_path / "ids.txt").write_text("1 2 3\n")
    np.save(tmp_path / "objects.npy", np.array([[1], "a"], dtype=object))
    for name, reason in [("ids.txt", "not a .npy file (expected an array written by numpy.save)"),
                         ("objects.npy", "not a readable .npy array (Object arrays cannot be loaded")]:
        assert main(["--model", str(tiny_hf_dir), "--ids", str(tmp_path / name), "--output",
                     str(tmp_path / "o.npy")]) == 2
        assert capsys.readouterr().err.startswith(f"error: --ids {tmp_path / name}: {reason}")

    (tmp_path / "a_file").write_text("x")
    under_a_file = tmp_path / "a_file" / "o.npy"
    assert main(["--model", str(tmp_path / "nomodel"), "--ids", str(tmp_path / "ids.npy"), "--output",
                 str(under_a_file)]) == 2  # the output is checked before the model is read
    assert capsys.readouterr().err == f"error: --output {under_a_file}: {tmp_path / 'a_file'} is a file, not a folder\n"


def test_greedy_continuation_from_loaded_checkpoint(tiny_tf_dir, tiny_cases):
    """12 greedy tokens by full forwards of the loaded model reproduce the fixture's greedy_out. The causal
    mask lets every step run on the final length (later slots hold zeros) and compile once."""
    config, params = load_model(str(tiny_tf_dir))
    prompt, expected = tiny_cases["greedy_prompt"], tiny_cases["greedy_out"]
    ids = np.zeros_like(expected)
    ids[:, : prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], expected.shape[1]):
        ids[:, t] = compute_logits(config, params, ids)[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(ids, expected)


def test_an_output_that_cannot_take_the_logits_is_one_error_line(tmp_path, tiny_hf_dir, capsys):
    """A device that is not a regular file is written directly; /dev/full's "No space left on device" named no
    file and ended in a traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int64))
    assert main(["--model", str(tiny_hf_dir), "--ids", str(tmp_path / "ids.npy"), "--output", "/dev/full"]) == 2
    assert capsys.readouterr().err == "error: /dev/full: No space left on device\n"


def test_logits_written_to_stdout_are_the_npy_alone(tmp_path, tiny_hf_dir, tiny_cases):
    """With --output /dev/stdout the "wrote logits" line followed the array on stdout, so the stream was no longer
    a .npy file; it goes to stderr then."""
    import io

    np.save(tmp_path / "ids.npy", tiny_cases["input_ids"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "gptsan.logits_cli", "--model", str(tiny_hf_dir), "--ids",
                             str(tmp_path / "ids.npy"), "--output", "/dev/stdout"], env=env, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    logits = np.load(io.BytesIO(result.stdout))
    np.testing.assert_allclose(logits, tiny_cases["logits_causal"], atol=TOLERANCE, rtol=0)
    assert result.stderr.decode() == f"wrote logits {list(logits.shape)} to /dev/stdout\n"
