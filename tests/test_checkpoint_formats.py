"""Checkpoint formats: every loader yields the fixture's parameters exactly; bad checkpoints are one error."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gptsan.checkpoint import detect_format, load_flat, load_model, native
from gptsan.checkpoint.names import hf_entries
from gptsan.errors import UserError
from gptsan.model import GPTSAN, flatten

ROOT = Path(__file__).resolve().parents[1]


def assert_same_params(flat, reference):
    assert sorted(flat) == sorted(reference)
    for name, value in reference.items():
        assert flat[name].dtype == np.float32, name
        np.testing.assert_array_equal(flat[name], value, err_msg=name)


@pytest.mark.parametrize("fixture, fmt", [("tiny_tf_dir", "gptsan-tf"), ("tiny_hf_dir", "hf")])
def test_fixture_formats_load_to_the_reference_names(request, fixture, fmt, tiny_names):
    path = request.getfixturevalue(fixture)
    assert detect_format(str(path)) == fmt
    config, params = load_model(str(path))
    assert (config.num_switch_layers, config.num_ext_layers, config.num_spout) == (2, 2, 16)
    assert_same_params(flatten(params), tiny_names)


def test_hf_table_covers_every_key_once(tiny_hf_dir, tiny_tf_dir):
    config, _ = load_flat(str(tiny_tf_dir))
    keys = [key for entry in hf_entries(config) for key in entry.hf_keys]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(load_file(str(tiny_hf_dir / "model.safetensors")))


def test_native_round_trip_gives_identical_params_and_logits(tmp_path, tiny_tf_dir, tiny_names, tiny_cases):
    config, flat = load_flat(str(tiny_tf_dir))
    out = tmp_path / "native"
    native.save(str(out), config, flat, {"output_dir": str(out)})
    assert detect_format(str(out)) == "native"
    assert json.loads((out / "parameters.json").read_text())["model_params"] == config.to_model_params()
    config2, params2 = load_model(str(out))
    assert config2 == config
    assert_same_params(flatten(params2), tiny_names)
    logits = GPTSAN(config2).apply({"params": params2}, tiny_cases["input_ids"]).logits
    np.testing.assert_allclose(np.asarray(logits), tiny_cases["logits_causal"], rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="already exists"):
        native.save(str(out), config, flat)
    assert [p.name for p in tmp_path.iterdir()] == ["native"]  # no temp directories left behind


def test_one_step_of_a_training_run_is_a_model_directory(tmp_path, tiny_tf_dir, tiny_names):
    """`--model out/2` was 'not a model directory': only the run's newest step could be read (`--model out`)."""
    import orbax.checkpoint as ocp

    from gptsan.convert.export import export
    from gptsan.model import unflatten

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny_tf_dir / "parameters.json", out)
    steps = {2: tiny_names, 4: {name: value + 1 for name, value in tiny_names.items()}}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(out, options=options) as manager:  # as gptsan/train/checkpoint.py saves
        for step, flat in steps.items():
            trained = {name: value for name, value in flat.items() if name.startswith("pasts/")}
            frozen = {name: value for name, value in flat.items() if name not in trained}
            state = {"step": np.int32(step), "params": unflatten(trained), "frozen": unflatten(frozen)}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    assert_same_params(load_flat(str(out))[1], steps[4])  # the newest
    for path in (out / "2", f"{out / '2'}/"):
        assert detect_format(str(path)) == "native"
        assert_same_params(load_flat(str(path))[1], steps[2])
    export(str(out / "2"), "gptsan-tf", str(tmp_path / "tf"))  # with the run's train_params
    parameters = json.loads((tmp_path / "tf" / "parameters.json").read_text())
    source = json.loads((tiny_tf_dir / "parameters.json").read_text())
    assert parameters == {**source, "train_params": {**source["train_params"], "output_dir": str(tmp_path / "tf")}}
    with pytest.raises(UserError, match="not a model directory"):
        detect_format(str(out / "2" / "state"))


def test_native_bfloat16_storage_loads_as_float32(tmp_path, tiny_tf_dir):
    config, flat = load_flat(str(tiny_tf_dir))
    native.save(str(tmp_path / "bf16"), config, flat, dtype="bfloat16")
    _, loaded = load_flat(str(tmp_path / "bf16"))
    for name, value in flat.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_allclose(loaded[name], value, rtol=2**-8, atol=0, err_msg=name)


def test_hf_float16_folder_with_tied_head_loads_as_float32(tmp_path, tiny_hf_dir, tiny_names):
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    tensors = {key: value.astype(np.float16) for key, value in tensors.items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    hf_config.pop("dtype")
    hf_config["torch_dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    _, flat = load_flat(str(tmp_path))
    for name, value in tiny_names.items():
        assert flat[name].dtype == np.float32
        np.testing.assert_array_equal(flat[name], value.astype(np.float16).astype(np.float32), err_msg=name)


def test_hf_untied_head_is_refused(tmp_path, tiny_hf_dir):
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path)
    with pytest.raises(UserError, match="lm_head.weight differs"):
        load_flat(str(tmp_path))


def test_an_hf_config_that_is_not_utf8_is_one_error(tmp_path, tiny_hf_dir):
    """It was a UnicodeDecodeError traceback (bad JSON was already one error line)."""
    shutil.copy(tiny_hf_dir / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match=r"config.json: not UTF-8 text \(invalid start byte at byte 0\)$"):
        load_flat(str(tmp_path))


@pytest.mark.parametrize("key, value, shown", [("d_model", "abc", '"abc"'), ("num_heads", None, "null"),
                                               ("vocab_size", 511.5, "511.5"), ("d_spout", True, "true"),
                                               ("layer_norm_epsilon", "1e-5", '"1e-5"')])
def test_an_hf_config_field_of_the_wrong_type_is_one_error(tmp_path, tiny_hf_dir, key, value, shown):
    """A string or null was a ValueError/TypeError traceback, 511.5 was read as 511 and true as 1."""
    shutil.copy(tiny_hf_dir / "model.safetensors", tmp_path)
    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, key: value}))
    kind = "a small positive number" if key == "layer_norm_epsilon" else "an integer"
    with pytest.raises(UserError) as caught:
        load_flat(str(tmp_path))
    assert str(caught.value) == f"{tmp_path / 'config.json'}: {key} must be {kind}, got {shown}"
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "d_model": 64.0}))
    assert load_flat(str(tmp_path))[0].num_hidden == 64  # an integer written as a float is still one


@pytest.mark.parametrize("key, value, message", [
    ("layer_norm_epsilon", 1e-6,
     "layer_norm_epsilon is 1e-06, but gptsan uses 1e-05 (GPTSAN's LayerNorm; parameters.json has no field to keep "
     "another)"),
    ("router_bias", True, "router_bias is true, but GPTSAN's router has no bias; expected false"),
])
def test_an_hf_config_under_which_the_port_computes_another_model_is_refused(tmp_path, tiny_hf_dir, capsys, key,
                                                                             value, message):
    """layer_norm_epsilon 1e-6 was read, and lost on conversion (parameters.json has no such field): the
    converted model silently computed with 1e-5."""
    from gptsan.convert.cli import main as convert_main

    source = tmp_path / "hf"
    source.mkdir()
    shutil.copy(tiny_hf_dir / "model.safetensors", source)
    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**hf_config, key: value}))
    with pytest.raises(UserError) as caught:
        load_flat(str(source))
    assert str(caught.value) == f"{source / 'config.json'}: {message}"
    assert convert_main(["--checkpoint", str(source), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {source / 'config.json'}: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # GPTSAN's own settings load, 1e-5 written through float32 too
    for same in ({key: False} if key == "router_bias" else {key: 1e-5}, {"layer_norm_epsilon": 9.999999747378752e-06}):
        (source / "config.json").write_text(json.dumps({**hf_config, **same}))
        assert load_flat(str(source))[0].num_hidden == 64


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, tiny_hf_dir, monkeypatch):
    shutil.copy(tiny_hf_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(UserError, match="needs torch.*model.safetensors"):
        load_flat(str(tmp_path))


def test_pytorch_bin_loads_with_torch_weights_only(tmp_path, tiny_hf_dir, tiny_names):
    torch = pytest.importorskip("torch", reason="torch is an optional peer dependency ([peer] extra)")
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    state = {key: torch.from_numpy(value) for key, value in tensors.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path)
    _, flat = load_flat(str(tmp_path))
    assert_same_params(flat, tiny_names)


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_sharded_hf_folders_load(tmp_path, tiny_hf_dir, tiny_names, kind):
    """save_pretrained shards a model over 5 GB (GPTSAN-2.8B in float32): the folder was 'not a model
    directory'."""
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path)
    stem, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for n, part in enumerate((sorted(tensors)[::2], sorted(tensors)[1::2])):
        shard = f"{stem}-0000{n + 1}-of-00002.{ext}"
        weight_map.update(dict.fromkeys(part, shard))
        if kind == "safetensors":
            save_file({key: tensors[key] for key in part}, tmp_path / shard)
        else:
            torch = pytest.importorskip("torch", reason="torch is an optional peer dependency ([peer] extra)")
            torch.save({key: torch.from_numpy(tensors[key]) for key in part}, tmp_path / shard)
    index = tmp_path / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    assert detect_format(str(tmp_path)) == "hf"
    assert_same_params(load_flat(str(tmp_path))[1], tiny_names)
    (tmp_path / f"{stem}-00002-of-00002.{ext}").unlink()
    with pytest.raises(UserError) as caught:
        load_flat(str(tmp_path))
    assert str(caught.value) == f"{index}: shard {stem}-00002-of-00002.{ext} is missing from the folder"


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_hf_weights_that_are_not_floating_point_are_refused(tmp_path, tiny_hf_dir, dtype):
    """They were cast to float32 silently (a LayerNorm gain of 0.98 read as 0)."""
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    key = "model.blocks.0.self_attn.norm.weight"
    tensors[key] = tensors[key].astype(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path)
    with pytest.raises(UserError) as caught:
        load_flat(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path / 'model.safetensors'}: {key} is {dtype}; expected floating-point "
                                 "weights (float32, float16, bfloat16)")


@pytest.mark.parametrize("dtype", ["int32", "bool", "string"])
def test_tf_variables_that_are_not_floating_point_are_refused(tmp_path, tiny_tf_dir, dtype):
    """Integer and boolean variables were cast to float32 silently; a string one was 'truncated or corrupt?'."""
    from gptsan.tf_runtime import tensorflow

    tf = tensorflow()
    shutil.copy(tiny_tf_dir / "parameters.json", tmp_path)
    shutil.copy(tiny_tf_dir / "checkpoint", tmp_path)
    reader = tf.train.load_checkpoint(str(tiny_tf_dir / "model"))
    names = sorted(reader.get_variable_to_shape_map())
    values = {name: reader.get_tensor(name) for name in names}
    key = "model/wob"
    values[key] = values[key].astype(str) if dtype == "string" else values[key].astype(dtype)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "model"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[name]) for name in names])
    with pytest.raises(UserError) as caught:
        load_flat(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path / 'model'}: {key} is {dtype}; expected floating-point weights "
                                 "(float32, float16, bfloat16)")


def test_tf_checkpoint_without_parameters_json_is_refused(tmp_path, tiny_tf_dir):
    for file in tiny_tf_dir.iterdir():
        if file.name != "parameters.json":
            shutil.copy(file, tmp_path)
    with pytest.raises(UserError, match="without parameters.json"):
        load_model(str(tmp_path))


def test_a_file_given_as_the_model_directory_is_named_as_a_file(tmp_path):
    """It was "model directory not found", which sends the user looking for a path that is there."""
    from gptsan.checkpoint import detect_format

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as caught:
        detect_format(str(tmp_path / "model.safetensors"))
    assert str(caught.value) == f"{tmp_path / 'model.safetensors'}: is a file; expected a model directory"
    with pytest.raises(UserError, match="^.*/nothing: model directory not found$"):
        detect_format(str(tmp_path / "nothing"))


def _corrupt_tf(src, dst, how):
    shutil.copytree(src, dst)
    if how == "truncated":
        data = next(dst.glob("model.data-*"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        from gptsan.checkpoint import tf_checkpoint

        _, flat = load_flat(str(src))
        if how == "missing":
            del flat["model/att1/o/kernel"]
        elif how == "extra":
            flat["model/att9/o/kernel"] = flat["model/att1/o/kernel"]
        else:
            flat["model/wte"] = flat["model/wte"][:-1]
        for file in list(dst.glob("model.*")) + [dst / "checkpoint"]:
            file.unlink()
        tf_checkpoint.write(str(dst), flat)


def _corrupt_hf(src, dst, how):
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    if how == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return
    tensors = load_file(file)
    if how == "missing":
        del tensors["model.blocks.1.self_attn.self_attn.out_proj.weight"]
    elif how == "extra":
        tensors["model.blocks.9.self_attn.norm.weight"] = tensors["model.blocks.1.self_attn.norm.weight"]
    else:
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-1]
    save_file(tensors, file)


def _corrupt_native(src, dst, how):
    config, flat = load_flat(str(src))
    native.save(str(dst), config, flat)
    if how == "truncated":
        for chunk in (dst / "params").rglob("d/*"):  # the data files (metadata stays intact)
            if chunk.stat().st_size > 10000:
                chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        return
    parameters = json.loads((dst / "parameters.json").read_text())
    key = {"missing": "num_ext_layers", "extra": "num_switch_layers", "misshapen": "num_vocabulary"}[how]
    parameters["model_params"][key] += 1  # the stored tensors no longer match the configuration
    (dst / "parameters.json").write_text(json.dumps(parameters))


EXPECTED_MESSAGE = {
    "truncated": "truncated or corrupt",
    "missing": "missing",
    "extra": "unexpected",
    "misshapen": "wrong shape",
}
CORRUPTERS = {"gptsan-tf": _corrupt_tf, "hf": _corrupt_hf, "native": _corrupt_native}


@pytest.mark.parametrize("how", sorted(EXPECTED_MESSAGE))
@pytest.mark.parametrize("fmt", sorted(CORRUPTERS))
def test_bad_checkpoints_fail_with_one_clear_error(tmp_path, tiny_tf_dir, tiny_hf_dir, fmt, how):
    src = tiny_hf_dir if fmt == "hf" else tiny_tf_dir
    dst = tmp_path / "bad"
    CORRUPTERS[fmt](src, dst, how)
    with pytest.raises(UserError) as caught:
        load_model(str(dst))
    message = str(caught.value)
    assert message.startswith(str(dst)), message
    assert EXPECTED_MESSAGE[how] in message, message
    assert "\n" not in message


def _truncate_array_data(native_dir: Path) -> None:
    """Cut the array data of a native checkpoint (its largest file; the index files are small) in half."""
    data = max((native_dir / "params").rglob("d/*"), key=lambda file: file.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


PLAIN_TRUNCATED = r"the stored data of model/[a-z0-9_/]+ ends early: a file of the checkpoint is truncated or missing"


def test_a_truncated_native_checkpoint_says_what_is_unreadable_in_plain_words(tmp_path, tiny_tf_dir):
    """It was TensorStore's status: `OUT_OF_RANGE: Error reading "model.mlp2.p1.kernel/0.0" in OCDBT database at
    local file "/...": Requested byte range [2537717, 2598572) is not valid for value of size 1338246`."""
    config, flat = load_flat(str(tiny_tf_dir))
    native.save(str(tmp_path / "native"), config, flat)
    _truncate_array_data(tmp_path / "native")
    with pytest.raises(UserError) as caught:
        load_flat(str(tmp_path / "native"))
    prefix = re.escape(f"{tmp_path / 'native' / 'params'}: cannot read the checkpoint (truncated or corrupt?): ")
    assert re.fullmatch(prefix + PLAIN_TRUNCATED, str(caught.value)), str(caught.value)


def test_a_truncated_checkpoint_read_as_jax_arrays_hides_the_tensorstore_repr(tmp_path, tiny_tf_dir):
    """Read as jax.Arrays (as resuming training reads its checkpoint), Orbax wraps TensorStore's error in one
    whose first line was the summary: `Encountered error while reading array index: (slice(0, 4, 1), ...). See
    full TensorStore details: <bound method ....spec of TensorStore({`."""
    import jax
    import orbax.checkpoint as ocp

    from gptsan.checkpoint.validate import error_summary

    config, flat = load_flat(str(tiny_tf_dir))
    native.save(str(tmp_path / "native"), config, flat)
    _truncate_array_data(tmp_path / "native")
    params = tmp_path / "native" / "params"
    native.drop_late_orbax_reads()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(params).item_metadata.tree
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda meta: ocp.ArrayRestoreArgs(sharding=device, global_shape=meta.shape), tree)
        with pytest.raises(Exception) as caught:
            checkpointer.restore(params, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    assert "TensorStore" in str(caught.value)  # what Orbax raises: its wrapper, the repr included
    assert re.fullmatch(PLAIN_TRUNCATED, error_summary(caught.value)), error_summary(caught.value)


SPEC = """ [tensorstore_spec='{\\"driver\\":\\"zarr\\"}'] [tensorstore_spec[1]='{}']"""  # TensorStore's spec


@pytest.mark.parametrize("status, summary", [
    # a training checkpoint with its index file (`state/d/...`) cut in half, or deleted: TensorStore's words
    ('OUT_OF_RANGE: Error opening "cast" driver: Error opening "zarr" driver: Error reading "data_position/.zarray" '
     'in OCDBT database at local file "/r/out/2/state/": Error reading Byte range [0, 11220) of local file '
     '"/r/out/2/state/d/72ae": Requested byte range [0, 11220) is not valid for value of size 5610' + SPEC,
     "file /r/out/2/state/d/72ae is cut short: 5610 bytes, at least 11220 expected"),
    ('NOT_FOUND: Error opening "cast" driver: Error opening "zarr" driver: Error reading "data_position/.zarray" '
     'in OCDBT database at local file "/r/out/2/state/": Error reading Byte range [0, 11107) of local file '
     '"/r/out/2/state/d/ef76"' + SPEC,
     "file /r/out/2/state/d/ef76 is missing"),
    # a data file zeroed, or deleted (read as empty)
    ('FAILED_PRECONDITION: Error reading "opt_state.0.mu.model.moe0.wi.kernel/0.0.0" in OCDBT database at local '
     'file "/r/out/2/state/": ZSTD_decompressStream() failed: Data corruption detected; at byte 0; at uncompressed '
     'byte 0', "the stored data of opt_state/0/mu/model/moe0/wi/kernel is corrupt (it does not decompress)"),
    ('FAILED_PRECONDITION: Error reading "model.att0.o.kernel/0.0.0" in OCDBT database at local file "/r/params/": '
     "Truncated Zstd-compressed stream; at byte 0; at uncompressed byte 0",
     "the stored data of model/att0/o/kernel ends early: a file of the checkpoint is truncated or missing"),
])
def test_tensorstore_errors_are_summarised_in_plain_words(status, summary):
    from gptsan.checkpoint.validate import error_summary

    wrapper = Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore "
                        "details: <bound method spec of TensorStore({\n  'base': {")  # what Orbax raises
    wrapper.__cause__ = ValueError(status)
    assert error_summary(wrapper) == summary


def test_native_missing_extra_and_misshapen_are_named(tmp_path, tiny_tf_dir):
    """The native case above changes parameters.json; name the offending tensors in the message."""
    dst = tmp_path / "bad"
    _corrupt_native(tiny_tf_dir, dst, "missing")
    named = r"missing model/an4/b, model/an4/g, model/att4/o/kernel and \d+ more"
    with pytest.raises(UserError, match=named):
        load_model(str(dst))


# ---- finding the checkpoint in an original (TF1) folder -------------------------------------------------


def test_a_tf_checkpoint_without_its_index_is_one_error_line(tmp_path, tiny_tf_dir):
    """TensorFlow's lookup printed `ERROR:tensorflow:Couldn't match files for checkpoint ...` before the error."""
    source = tmp_path / "noidx"
    shutil.copytree(tiny_tf_dir, source)
    (source / "model.index").unlink()
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    command = [sys.executable, str(ROOT / "run_modelconvert.py"), "--checkpoint", "noidx", "--output", "out"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == ("error: noidx: expected one TF checkpoint (`checkpoint` file or a single *.index), "
                             "found 0 index files; the `checkpoint` file names model, which is not here\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("garbage", [b"garbage\n", bytes(range(256))])
def test_a_garbled_state_file_beside_one_index_is_ignored_quietly(tmp_path, tiny_tf_dir, tiny_names, caplog,
                                                                 garbage):
    """The only *.index is the checkpoint whatever the state file says; TensorFlow's lookup logged
    `WARNING:tensorflow:...: Checkpoint ignored` for it."""
    source = tmp_path / "garbled"
    shutil.copytree(tiny_tf_dir, source)
    (source / "checkpoint").write_bytes(garbage)
    _, flat = load_flat(str(source))
    assert_same_params(flat, tiny_names)
    assert [record.getMessage() for record in caplog.records if record.name == "tensorflow"] == []


def test_a_garbled_state_file_beside_several_indexes_is_one_error(tmp_path, tiny_tf_dir):
    source = tmp_path / "garbled"
    shutil.copytree(tiny_tf_dir, source)
    (source / "checkpoint").write_text("garbage\n")
    shutil.copy(source / "model.index", source / "other.index")
    with pytest.raises(UserError) as caught:
        load_flat(str(source))
    assert str(caught.value) == (f"{source}: expected one TF checkpoint (`checkpoint` file or a single *.index), "
                                 "found 2 index files (model, other)")


def test_a_state_file_naming_a_step_that_is_not_there_is_said(tmp_path, tiny_tf_dir, tiny_names, capsys):
    """It read the folder's only other checkpoint without a word; with two others, the error did not say which
    step was missing."""
    source = tmp_path / "stale"
    shutil.copytree(tiny_tf_dir, source)
    (source / "checkpoint").write_text('model_checkpoint_path: "/old/run/model-200"\n')
    assert_same_params(load_flat(str(source))[1], tiny_names)
    assert capsys.readouterr().err == (f"warning: {source}: the `checkpoint` file names model-200, which is not "
                                       "here; reading model, the folder's only checkpoint\n")
    shutil.copy(source / "model.index", source / "model-50.index")
    with pytest.raises(UserError) as caught:
        load_flat(str(source))
    assert str(caught.value) == (f"{source}: expected one TF checkpoint (`checkpoint` file or a single *.index), "
                                 "found 2 index files (model, model-50); the `checkpoint` file names model-200, "
                                 "which is not here")


def test_the_state_file_chooses_among_checkpoints_by_its_last_path_part(tmp_path, tiny_tf_dir, tiny_names):
    """The original's state file named the folder it was trained in (often gs://); the folder given is read."""
    from gptsan.checkpoint import tf_checkpoint

    source = tmp_path / "two"
    shutil.copytree(tiny_tf_dir, source)
    changed = {name: value + 1 for name, value in tiny_names.items()}
    tf_checkpoint.write(str(tmp_path / "newer"), changed)
    for file in (tmp_path / "newer").glob("model.*"):
        shutil.copy(file, source / file.name.replace("model", "newer", 1))
    (source / "checkpoint").write_text('model_checkpoint_path: "gs://old-bucket/run/newer"\n'
                                       'all_model_checkpoint_paths: "gs://old-bucket/run/model"\n')
    assert_same_params(load_flat(str(source))[1], changed)
    (source / "checkpoint").write_text('model_checkpoint_path: "model"\n')
    assert_same_params(load_flat(str(source))[1], tiny_names)


@pytest.mark.parametrize("state_file", ["kept", "removed"])
def test_a_tf_checkpoint_in_a_folder_with_brackets_loads(tmp_path, tiny_tf_dir, tiny_names, state_file):
    """TensorFlow takes a checkpoint prefix as a file pattern: `ckpt[1]/model` matched nothing."""
    source = tmp_path / "ckpt[1]"
    shutil.copytree(tiny_tf_dir, source)
    if state_file == "removed":
        (source / "checkpoint").unlink()
    assert detect_format(str(source)) == "gptsan-tf"
    assert_same_params(load_flat(str(source))[1], tiny_names)


@pytest.mark.parametrize(("key", "variable"), [("num_vocabulary", "model/wte"), ("num_spout", "pasts/mlp0/kernel")])
@pytest.mark.parametrize("folder", ["ckpt", "ckpt[1]"])
def test_a_tf_checkpoint_whose_parameters_json_lacks_a_size_takes_it_from_the_checkpoint(
        tmp_path, tiny_tf_dir, tiny_names, folder, key, variable, capsys):
    """The original's trainer wrote num_vocabulary into its checkpoints' parameters.json; a checkpoint given
    the hand-written file it was trained from (which has none) was refused: `model_params lacks num_vocabulary`.
    Users' files may also lack num_spout, which fell back to the release's 128 and then refused the checkpoint
    (the tiny model's spout is 16 wide). The variable's rows say each (read from the index alone; through a linked
    folder for `[`)."""
    from gptsan.convert.cli import main as convert

    source = tmp_path / folder
    shutil.copytree(tiny_tf_dir, source)
    parameters = json.loads((source / "parameters.json").read_text())
    size = parameters["model_params"].pop(key)
    (source / "parameters.json").write_text(json.dumps(parameters))
    config, flat = load_flat(str(source))
    assert getattr(config, key) == size == tiny_names[variable].shape[0]
    assert_same_params(flat, tiny_names)
    assert convert(["--checkpoint", str(source), "--output", str(tmp_path / "out"), "--add_extra_stage", "1"]) == 0
    assert json.loads((tmp_path / "out" / "parameters.json").read_text())["model_params"][key] == size
    assert "warning" not in capsys.readouterr().err
