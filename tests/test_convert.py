"""run_modelconvert.py: copied parameters bit for bit, new layers as the spec says, the four name lists."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptsan.checkpoint import load_flat, native
from gptsan.convert.cli import DEFAULT_TRAIN_PARAMS, main
from gptsan.logits_cli import compute_logits
from gptsan.model import unflatten

ROOT = Path(__file__).resolve().parents[1]
NEW_LAYER_NAMES = ("att{l}/qkv/kernel", "att{l}/o/kernel", "an{l}/g", "an{l}/b", "ln{l}/g", "ln{l}/b",
                   "mlp{l}/p1/kernel", "mlp{l}/p1/bias", "mlp{l}/p2/kernel", "mlp{l}/p2/bias")


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module", params=["tiny_tf_dir", "tiny_hf_dir"])
def converted(request, tmp_path_factory):
    """Each fixture converted with --add_extra_stage 2."""
    src = request.getfixturevalue(request.param)
    dst = tmp_path_factory.mktemp("convert") / "extended"
    assert main(["--checkpoint", str(src), "--output", str(dst), "--add_extra_stage", "2",
                 "--seed", "3"]) == 0
    return src, dst


def test_extended_model_copies_the_source_and_adds_layers(converted, tiny_names):
    src, dst = converted
    config, flat = load_flat(str(dst))
    assert (config.num_switch_layers, config.num_ext_layers) == (2, 4)
    new_names = {f"model/{name.format(l=l)}" for l in (4, 5) for name in NEW_LAYER_NAMES}
    assert set(flat) == set(tiny_names) | new_names
    for name, value in tiny_names.items():
        if name != "pasts/out/kernel":
            np.testing.assert_array_equal(flat[name], value, err_msg=name)  # bit for bit
    for l in (4, 5):
        for norm in ("an", "ln"):
            np.testing.assert_array_equal(flat[f"model/{norm}{l}/g"], np.ones(64, np.float32))
            np.testing.assert_array_equal(flat[f"model/{norm}{l}/b"], np.zeros(64, np.float32))
        assert flat[f"model/att{l}/qkv/kernel"].shape == (64, 3, 4, 16)
        assert flat[f"model/att{l}/o/kernel"].shape == (4, 16, 64)
        assert flat[f"model/mlp{l}/p1/kernel"].shape == (64, 256)
        assert flat[f"model/mlp{l}/p2/bias"].shape == (64,)
    out = flat["pasts/out/kernel"]
    assert out.shape == (16, 6 * 2 * 64)  # re-initialised for 6 layers
    drawn = np.concatenate([flat["model/att4/qkv/kernel"].ravel(), flat["model/mlp5/p1/bias"].ravel(),
                            out.ravel()])
    assert abs(drawn.std() - 0.02) < 0.002 and abs(drawn.mean()) < 0.002  # N(0, 0.02)


def test_extended_model_name_lists_and_parameters_json(converted, tiny_names, tiny_tf_dir):
    src, dst = converted
    _, flat = load_flat(str(dst))
    non_spout = sorted(name for name in tiny_names if not name.startswith("pasts/"))
    assert read_json(dst / "ignore-params.json") == non_spout
    assert read_json(dst / "ignore-params.json") == sorted(read_json(tiny_tf_dir / "ignore-params.json"))
    assert read_json(dst / "transformer-params.json") == sorted(set(tiny_names) - {"pasts/out/kernel"})
    assert read_json(dst / "all-params.json") == sorted(flat)
    parameters = read_json(dst / "parameters.json")
    expected_train = dict(read_json(tiny_tf_dir / "parameters.json")["train_params"]) if src == tiny_tf_dir \
        else dict(DEFAULT_TRAIN_PARAMS)
    expected_train["output_dir"] = str(dst)
    assert parameters["train_params"] == expected_train
    assert parameters["model_params"]["num_ext_layers"] == 4


def test_same_seed_same_model_other_seed_other_layers(converted, tmp_path):
    src, dst = converted
    _, first = load_flat(str(dst))
    for name, seed in (("same", "3"), ("other", "4")):
        args = ["--checkpoint", str(src), "--output", str(tmp_path / name), "--add_extra_stage", "2"]
        assert main([*args, "--seed", seed]) == 0
    _, same = load_flat(str(tmp_path / "same"))
    _, other = load_flat(str(tmp_path / "other"))
    for name in first:
        np.testing.assert_array_equal(same[name], first[name], err_msg=name)
    assert not np.array_equal(other["model/att4/qkv/kernel"], first["model/att4/qkv/kernel"])
    np.testing.assert_array_equal(other["model/att1/qkv/kernel"], first["model/att1/qkv/kernel"])


def test_plain_conversion_by_the_script_reproduces_fixture_logits(tmp_path, tiny_hf_dir, tiny_cases,
                                                                   tiny_names):
    """The top-level script, run from another directory with no PYTHONPATH, then the fixture's logits."""
    dst = tmp_path / "plain"
    env = dict(os.environ, PYTHONPATH="")
    command = [sys.executable, str(ROOT / "run_modelconvert.py"), "--checkpoint", str(tiny_hf_dir),
               "--output", str(dst), "--add_extra_stage", "0"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # what config.json could not say, said (the converted parameters.json took 1 and lm without a word)
    assert result.stderr.splitlines() == [
        f"warning: {tiny_hf_dir}: an HF config.json has no num_pallarelizm or train_mode; {dst} gets "
        "num_pallarelizm 1 (heads and experts not split over devices; GPTSAN-2.8B's release used 8) and train_mode "
        "lm (the port's models are prefix-LMs: train them with gptsan-train --mode hybrid); edit its parameters.json "
        "to change them"]
    config, flat = load_flat(str(dst))
    assert set(flat) == set(tiny_names)
    assert read_json(dst / "transformer-params.json") == sorted(tiny_names)
    params = unflatten(flat)
    for case, kwargs in (("logits_causal", {}), ("logits_spout", {"spout": tiny_cases["spout"]})):
        logits = compute_logits(config, params, tiny_cases["input_ids"], **kwargs)
        np.testing.assert_allclose(logits, tiny_cases[case], rtol=0, atol=1e-4, err_msg=case)


def test_source_without_ete_gets_zero_ete(tmp_path, tiny_tf_dir, tiny_names):
    """A Switch-only source (X = 0) has no ete: the converter adds it as zeros."""
    config, flat = load_flat(str(tiny_tf_dir))
    extended = tuple(f"model/{scope}{l}/" for scope in ("att", "an", "ln", "mlp") for l in (2, 3))
    switch_only = {name: value for name, value in flat.items()
                   if name != "model/ete" and not name.startswith(extended)}
    switch_only["pasts/out/kernel"] = flat["pasts/out/kernel"][:, : 2 * 2 * 64]
    native.save(str(tmp_path / "src"), config.replace(num_ext_layers=0), switch_only)
    assert main(["--checkpoint", str(tmp_path / "src"), "--output", str(tmp_path / "dst"),
                 "--add_extra_stage", "1"]) == 0
    new_config, out = load_flat(str(tmp_path / "dst"))
    assert new_config.num_ext_layers == 1
    np.testing.assert_array_equal(out["model/ete"], np.zeros((64, 64), np.float32))
    assert "model/mlp2/p1/kernel" in out and out["pasts/out/kernel"].shape == (16, 3 * 2 * 64)
    assert "model/ete" not in read_json(tmp_path / "dst" / "ignore-params.json")


def test_num_spout_freeze_and_bfloat16_storage(tmp_path, tiny_tf_dir, tiny_names, capsys):
    dst = tmp_path / "spout8"
    assert main(["--checkpoint", str(tiny_tf_dir), "--output", str(dst), "--num_spout", "8",
                 "--freeze", "spout", "--dtype", "bfloat16"]) == 0
    # said at once, not when a training run starts
    assert capsys.readouterr().err == (f"warning: {dst}: ignore-params.json lists every parameter, so training with "
                                       "it will change nothing (--freeze spout with no --add_extra_stage)\n")
    config, flat = load_flat(str(dst))
    assert config.num_spout == 8
    assert flat["pasts/mlp3/kernel"].shape == (8, 8) and flat["pasts/out/kernel"].shape == (8, 4 * 2 * 64)
    for name, value in tiny_names.items():
        if not name.startswith("pasts/"):
            assert flat[name].dtype == np.float32
            # bfloat16 storage: each value rounded to 8 significant bits
            np.testing.assert_allclose(flat[name], value, rtol=2**-8, atol=0, err_msg=name)
    assert read_json(dst / "ignore-params.json") == sorted(flat)  # the spout frozen too: everything
    assert not any(n.startswith("pasts/") for n in read_json(dst / "transformer-params.json"))


def test_same_width_num_spout_reinitialises_a_spout_that_passes_signal(tmp_path, tiny_tf_dir, tiny_names):
    """A re-initialised spout MLP is fan-in scaled, so a one-hot class vector reaches the last layer at O(0.1)
    (the original's N(0, 0.01) would shrink it by ~0.04 per layer: to ~1e-11 after 8 layers)."""
    dst = tmp_path / "respout"
    assert main(["--checkpoint", str(tiny_tf_dir), "--output", str(dst), "--num_spout", "16"]) == 0
    _, flat = load_flat(str(dst))
    assert not np.array_equal(flat["pasts/mlp0/kernel"], tiny_names["pasts/mlp0/kernel"])
    np.testing.assert_allclose(flat["pasts/mlp0/kernel"].std(), 16**-0.5, rtol=0.15)
    h = np.eye(16, dtype=np.float32)
    for i in range(8):
        h = np.tanh(h @ flat[f"pasts/mlp{i}/kernel"])
    assert np.abs(h).mean() > 0.05


def _listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("case", ["negative", "existing", "missing_tensor", "no_source", "bad_bucket", "bracket"])
def test_bad_conversions_fail_and_write_nothing(tmp_path, tiny_hf_dir, capsys, case):
    from safetensors.numpy import load_file, save_file

    src, dst = tiny_hf_dir, tmp_path / "dst"
    args = {"negative": ["--add_extra_stage", "-1"]}.get(case, [])
    if case == "existing":
        dst.mkdir()
    if case == "missing_tensor":
        src = tmp_path / "src"
        src.mkdir()
        (src / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
        tensors = load_file(tiny_hf_dir / "model.safetensors")
        del tensors["model.blocks.0.self_attn.norm.bias"]
        save_file(tensors, src / "model.safetensors")
    if case == "no_source":
        src = tmp_path / "nowhere"
    if case == "bad_bucket":  # GCS bucket names have 3 characters at least: refused before any request
        dst = "gs://b/model"
    if case == "bracket":  # Orbax globs the folder it saves in: it wrote params/ unreadable, and "wrote" was said
        dst = tmp_path / "dst[1]"
    before = _listing(tmp_path)
    assert main(["--checkpoint", str(src), "--output", str(dst), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"negative": "--add_extra_stage", "existing": "already exists",
                "missing_tensor": "missing model.blocks.0.self_attn.norm.bias", "no_source": "not found",
                "bad_bucket": "gs://b/model: 'b' is not a GCS bucket name",
                "bracket": "a path with '[' is not supported"}
    assert expected[case] in err
    assert _listing(tmp_path) == before  # nothing written, no temp directory left


def test_source_train_params_that_training_would_refuse_are_one_error_line(tmp_path, tiny_tf_dir, capsys):
    """A native source whose parameters.json had a train_params that is not an object stopped the conversion
    with a ValueError traceback."""
    src = tmp_path / "native"
    assert main(["--checkpoint", str(tiny_tf_dir), "--output", str(src), "--add_extra_stage", "1"]) == 0
    capsys.readouterr()
    parameters = read_json(src / "parameters.json")
    good_train_params = parameters["train_params"]
    for train_params, message in [
        ("x", "train_params must be a JSON object, got \"x\""),
        ({**good_train_params, "batch_size": "abc"}, "train_params.batch_size must be a positive integer, got \"abc\""),
    ]:
        (src / "parameters.json").write_text(json.dumps({**parameters, "train_params": train_params}))
        before = _listing(tmp_path)
        assert main(["--checkpoint", str(src), "--output", str(tmp_path / "dst")]) == 2
        assert capsys.readouterr().err == f"error: {src / 'parameters.json'}: {message}\n"
        assert _listing(tmp_path) == before


def test_a_ctrl_c_while_params_are_written_lets_orbax_finish_then_removes_everything(tiny_tf_dir, tmp_path):
    """Orbax's writes went on in background threads after a Ctrl-C and refilled the staging folder as it was
    removed: hidden `.OUT.tmp-*` folders were left beside --output (8 of 16 timed runs). The save now runs to
    its end under a first Ctrl-C, then the tool stops and removes it."""
    script = f"""
import signal, sys
import orbax.checkpoint as ocp
from gptsan.convert.cli import main
real_save = ocp.PyTreeCheckpointer.save
def save(self, *args, **kwargs):
    signal.raise_signal(signal.SIGINT)  # a Ctrl-C as the write starts
    real_save(self, *args, **kwargs)
    print("the save ended", flush=True)
ocp.PyTreeCheckpointer.save = save
sys.exit(main(["--checkpoint", {str(tiny_tf_dir)!r}, "--output", {str(tmp_path / "out")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (130, "the save ended\n"), done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_source_without_train_params_gets_the_release_values_with_a_warning(tiny_tf_dir, tmp_path, capsys):
    """The converted model had only output_dir in train_params, and training refused it."""
    src = tmp_path / "src"
    src.mkdir()
    for file in tiny_tf_dir.iterdir():
        shutil.copy(file, src)
    parameters = read_json(tiny_tf_dir / "parameters.json")
    del parameters["train_params"]
    (src / "parameters.json").write_text(json.dumps(parameters))
    assert main(["--checkpoint", str(src), "--output", str(tmp_path / "out")]) == 0
    train_params = read_json(tmp_path / "out" / "parameters.json")["train_params"]
    assert train_params == {**DEFAULT_TRAIN_PARAMS, "output_dir": str(tmp_path / "out")}
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {src / 'parameters.json'}: train_params lacks batch_size, base_lr, "
                       "num_warmup_steps, max_to_keep_save, checkpoint_per_hours, checkpoint_per_steps; the "
                       "converted model has the release's values (batch_size 16, base_lr 0.0001, num_warmup_steps "
                       "2000, max_to_keep_save 12, checkpoint_per_hours 1, checkpoint_per_steps 10000)"]


def test_an_output_below_a_file_is_one_line_naming_the_flag(tiny_tf_dir, tmp_path, capsys):
    """It was `error: DIR/afile: File exists` (os.makedirs's), without the flag."""
    (tmp_path / "afile").write_text("")
    assert main(["--checkpoint", str(tiny_tf_dir), "--output", str(tmp_path / "afile" / "sub")]) == 2
    assert capsys.readouterr().err == (f"error: --output {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a "
                                       "file, not a folder\n")
