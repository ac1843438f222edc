"""`gptsan-plan`: will a training run fit? Per-device memory of a model on N devices, without allocating it.

    gptsan-plan --parameter_file configs/gptsan-3b-finetune.json --devices 8 --trainable extended

Method:
  - Parameters: shapes from `jax.eval_shape` of the model's init (nothing allocated); each parameter's
    per-device bytes are its float32 size divided by the mesh axes the sharding rules
    (gptsan/model/sharding.py) split it over, exactly as training lays it out.
  - Optimizer state: Adam's two float32 slots for each trainable parameter, sharded like the parameter.
  - Step temporaries (activations kept for the backward pass, gradients, workspace): XLA's own
    `memory_analysis()` of the train step compiled for the N-device mesh from abstract inputs
    (`jit(step).lower(ShapeDtypeStructs).compile()`), on N simulated CPU devices
    (`--xla_force_host_platform_device_count=N`, set before JAX loads). It is XLA's CPU schedule: a GPU or
    TPU compiler fuses and schedules differently, so treat it as an estimate (typically within tens of
    percent); `--skip_activations` leaves it out (it takes a minute for a 3B model).
A device fits the run when parameters + optimizer state + step temporaries fit its memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from gptsan.errors import UserError, cli_main, warn

GiB = 1024**3
DEVICES_GIB = {"TPU v3 core": 16, "TPU v4 chip": 32, "A100 80GB": 80, "H100 80GB": 80}
ADAM_SLOTS = 2  # mu and nu, float32
TRAINABLE_CHOICES = "all | extended | an ignore-params.json"


def parse_mesh(text: str | None, devices: int, num_pallarelizm: int) -> tuple[int, int, int]:
    """(data, expert, model) from "D,E,M", or by default the model axis training takes (num_pallarelizm as far as it
    divides the device count), expert 1, data the rest."""
    if not text:
        from gptsan.model.sharding import model_axis_size

        model = model_axis_size(num_pallarelizm, devices)
        return devices // model, 1, model
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--mesh: expected data,expert,model sizes such as 1,1,8, got {text!r}")
    if math.prod(shape) != devices:
        raise UserError(f"--mesh: {text} is {math.prod(shape)} devices, but --devices is {devices}")
    from gptsan.model.sharding import model_axis_size

    trained = model_axis_size(num_pallarelizm, devices // shape[1])
    if shape[2] != trained:  # a what-if: training on these devices lays the model out otherwise
        warn(f"--mesh {text}: gptsan-train takes a model axis of {trained} here (model_params.num_pallarelizm "
             f"{num_pallarelizm} as far as {devices // shape[1]} devices allow), not {shape[2]}; set num_pallarelizm "
             f"to {shape[2]} to train as planned")
    return shape


def frozen_names(trainable: str, config) -> frozenset[str]:
    """The names not trained. "extended": everything but the extended layers `att/an/ln/mlp{l}` for
    l >= num_switch_layers, `ete` and the spout network (the converter's fine-tune ignore list for a source
    without extended layers; from one with them, the converter freezes those too: give its ignore-params.json)."""
    from gptsan import storage
    from gptsan.model.params import expected_shapes
    from gptsan.train.loop import read_ignore_list

    if trainable == "all":
        return frozenset()
    if trainable == "extended":
        return frozenset(name for name in expected_shapes(config) if not is_extended(name, config))
    if not storage.exists(trainable):  # a typo of a choice ("extend") was "extend: ... file not found"
        raise UserError(f"--trainable {trainable}: expected all, extended or an ignore-params.json file")
    return read_ignore_list(trainable, config)


def is_extended(name: str, config) -> bool:
    if name.startswith("pasts/") or name == "model/ete":
        return True
    scope = name.split("/")[1]
    digits = scope.lstrip("abcdefghijklmnopqrstuvwxyz_")
    return scope[: len(scope) - len(digits)] in ("att", "an", "ln", "mlp") and digits.isdigit() and \
        int(digits) >= config.num_switch_layers


def parameter_bytes(config, mesh_shape: tuple[int, int, int], frozen: frozenset[str]) -> dict:
    """Counts and per-device bytes of all and of trainable parameters under the sharding rules."""
    import jax
    from jax.sharding import AbstractMesh, PartitionSpec

    from gptsan.model.params import abstract_params, flatten, logical_axes
    from gptsan.model.sharding import MESH_AXES, mesh_spec

    mesh = AbstractMesh(mesh_shape, MESH_AXES)
    axes = flatten(jax.tree_util.tree_map(lambda spec: spec, logical_axes(config),
                                          is_leaf=lambda node: isinstance(node, PartitionSpec)))
    totals = {"parameters": 0, "trainable": 0, "parameter_bytes": 0, "trainable_bytes": 0}
    for name, abstract in flatten(abstract_params(config)).items():
        spec = mesh_spec(axes[name], abstract.shape, mesh)
        split = math.prod(math.prod(mesh.shape[a] for a in (part if isinstance(part, tuple) else (part,)))
                          for part in spec if part is not None)
        count = math.prod(abstract.shape)
        per_device = count // split * abstract.dtype.itemsize
        totals["parameters"] += count
        totals["parameter_bytes"] += per_device
        if name not in frozen:
            totals["trainable"] += count
            totals["trainable_bytes"] += per_device
    return totals


def step_memory(config, mesh_shape, frozen, batch: int, accumulate_steps: int) -> dict:
    """XLA's memory analysis of the jitted train step, compiled (not run) for the mesh."""
    import functools

    import jax

    from gptsan.data.schema import FEATURES
    from gptsan.model.params import abstract_params
    from gptsan.model.sharding import batch_sharding, make_mesh
    from gptsan.train.accumulate import make_accumulating_train_step
    from gptsan.train.loop import state_shardings
    from gptsan.train.optim import make_optimizer
    from gptsan.train.precision import LossScale
    from gptsan.train.state import create_state
    from gptsan.train.step import StepOptions

    devices = jax.devices()
    if len(devices) < math.prod(mesh_shape):
        raise UserError(f"--devices: JAX sees {len(devices)} devices here, fewer than {math.prod(mesh_shape)}")
    mesh = make_mesh(model=mesh_shape[2], expert=mesh_shape[1], devices=devices[: math.prod(mesh_shape)])
    optimizer, schedule = make_optimizer("adam", 1e-4, 0)
    init = functools.partial(create_state, frozen_names=frozen, optimizer=optimizer, seed=0,
                             loss_scale=LossScale.for_dtype(config.dtype))
    abstract = jax.eval_shape(init, abstract_params(config))
    shardings = state_shardings(abstract, config, mesh, optimizer, frozen)
    batch_shard = {name: batch_sharding(mesh) for name in FEATURES}
    rows = {"x": (batch, config.num_contexts), "y": (batch, config.num_contexts), "i": (batch,),
            "num_input": (batch,)}
    abstract_batch = {name: jax.ShapeDtypeStruct(rows[name], "int32") for name in FEATURES}
    step = make_accumulating_train_step(config, optimizer, schedule, StepOptions(), accumulate_steps)
    jitted = jax.jit(step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, None),
                     donate_argnums=0)
    with jax.set_mesh(mesh):
        analysis = jitted.lower(abstract, abstract_batch).compile().memory_analysis()
    return {"step_temporary_bytes": int(analysis.temp_size_in_bytes),
            "step_argument_bytes": int(analysis.argument_size_in_bytes)}


def global_batch(batch: int | None, train_params: dict, parameter_file: str,
                 mesh_shape: tuple[int, int, int]) -> int:
    """--batch, else train_params.batch_size, else one row per device of the data and expert axes, which
    split the batch's rows (gptsan/model/sharding.py): it must be a multiple of their size."""
    from gptsan.model.sharding import MESH_AXES, check_batch_split

    if batch is not None:
        name = "--batch"
    elif "batch_size" in train_params:
        name, batch = f"{parameter_file}: train_params.batch_size", train_params["batch_size"]
    else:
        return mesh_shape[0] * mesh_shape[1]
    check_batch_split(batch, dict(zip(MESH_AXES, mesh_shape, strict=True)), name)
    return batch


def plan(parameter_file: str, devices: int, mesh: str | None = None, batch: int | None = None,
         trainable: str = "all", accumulate_steps: int = 1, remat: str = "none", dtype: str = "float32",
         activations: bool = True, vocabulary: str | None = None) -> dict:
    from gptsan.model.config import ModelConfig, read_parameters_json
    from gptsan.model.expert_parallel import check_expert_axis
    from gptsan.tokenizer import with_vocabulary_size
    from gptsan.train.accumulate import check_accumulate_steps
    from gptsan.train.config import TrainParams

    if devices < 1:
        raise UserError(f"--devices: expected a positive count, got {devices}")
    if batch is not None and batch < 1:
        raise UserError(f"--batch: expected a positive count, got {batch}")
    parameters = read_parameters_json(parameter_file)
    model_params = with_vocabulary_size(parameters["model_params"], vocabulary)
    config = ModelConfig.from_model_params(model_params, parameter_file, dtype=dtype, remat=remat)
    train_params = TrainParams.check_fields(parameters["train_params"], parameter_file)
    mesh_shape = parse_mesh(mesh, devices, config.num_pallarelizm)
    check_expert_axis(config.num_experts, mesh_shape[1], f"--mesh {mesh}")
    batch = global_batch(batch, train_params, parameter_file, mesh_shape)
    check_accumulate_steps(accumulate_steps, batch)
    frozen = frozen_names(trainable, config)
    report = {"parameter_file": parameter_file, "devices": devices,
              "mesh": dict(zip(("data", "expert", "model"), mesh_shape, strict=True)), "batch": batch,
              "accumulate_steps": accumulate_steps, "remat": remat, "dtype": dtype}
    report.update(parameter_bytes(config, mesh_shape, frozen))
    report["optimizer_bytes"] = ADAM_SLOTS * report["trainable_bytes"]
    total = report["parameter_bytes"] + report["optimizer_bytes"]
    if activations:
        report.update(step_memory(config, mesh_shape, frozen, batch, accumulate_steps))
        total += report["step_temporary_bytes"]
    report["total_bytes"] = total
    report["fits"] = {name: total <= size * GiB for name, size in DEVICES_GIB.items()}
    return report


def describe(report: dict) -> str:
    mesh = " x ".join(f"{name} {size}" for name, size in report["mesh"].items())
    lines = [
        f"{report['parameter_file']} on {report['devices']} devices ({mesh}), global batch {report['batch']}"
        f", accumulate {report['accumulate_steps']}, remat {report['remat']}, {report['dtype']} compute",
        f"parameters        {report['parameters']:>15,d}  ({report['trainable']:,d} trainable)",
        f"per device: parameters      {report['parameter_bytes'] / GiB:8.3f} GiB",
        f"            optimizer state {report['optimizer_bytes'] / GiB:8.3f} GiB  (Adam, 2 float32 slots)",
    ]
    if "step_temporary_bytes" in report:
        lines.append(f"            step temporaries {report['step_temporary_bytes'] / GiB:7.3f} GiB  "
                     "(activations, gradients; XLA CPU estimate)")
    else:
        lines.append("            step temporaries: not estimated (--skip_activations)")
    lines.append(f"            total           {report['total_bytes'] / GiB:8.3f} GiB")
    for name, fits in report["fits"].items():
        lines.append(f"{name:<12} ({DEVICES_GIB[name]:>2} GiB): {'fits' if fits else 'does not fit'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptsan-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--parameter_file", required=True, help="parameters.json (model_params, train_params)")
    p.add_argument("--devices", type=int, required=True, help="number of devices (chips or cores)")
    p.add_argument("--mesh", default=None,
                   help="data,expert,model sizes (default: model = gcd(num_pallarelizm, devices), expert 1)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: train_params.batch_size)")
    p.add_argument("--trainable", default="all", help=TRAINABLE_CHOICES)
    p.add_argument("--accumulate_steps", type=int, default=1)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--skip_activations", action="store_true", help="parameters and optimizer state only")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--vocabulary", default=None,
                   help="ja-swe36k.txt or a SentencePiece .model: num_vocabulary, where parameters.json has none "
                        "(as gptsan-train's)")
    return p


def simulate_devices(count: int) -> None:
    """N CPU devices for compiling the step, when JAX has not loaded yet."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.skip_activations:
        simulate_devices(args.devices)
    report = plan(args.parameter_file, args.devices, args.mesh, args.batch, args.trainable,
                  args.accumulate_steps, args.remat, args.dtype, activations=not args.skip_activations,
                  vocabulary=args.vocabulary)
    print(json.dumps(report) if args.json else describe(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
