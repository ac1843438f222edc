"""gptsan-convert / run_modelconvert.py: copy a model into a new native model directory, optionally adding
extended layers (`--add_extra_stage N`) or changing the spout width, as the original converter did.

    run_modelconvert.py --checkpoint SRC --output DST --add_extra_stage N
        [--num_spout P] [--freeze spout] [--dtype float32|bfloat16] [--seed S]

SRC: an original TF checkpoint dir, an HF folder or a native model dir (local or gs://). DST (refused if it
exists) gets the native checkpoint, parameters.json (train_params.output_dir = DST), ignore-params.json
(every SRC parameter except the spout network, plus the spout with --freeze spout), transformer-params.json
(the parameters copied from SRC unchanged) and all-params.json (every parameter of DST).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gptsan import storage
from gptsan.checkpoint.dtypes import NATIVE_STORAGE_DTYPES
from gptsan.errors import UserError, cli_main, warn
from gptsan.model.config import read_parameters_json
from gptsan.seed import seed_flag
from gptsan.train.config import TrainParams

# The checkpoint formats and the extension bring JAX and Flax (seconds of imports): they are imported inside the
# functions, under cli_main, so a Ctrl-C while they load ends in `interrupted`, not a traceback.

SPOUT_PREFIX = "pasts/"
# train_params for a source without parameters.json (an HF folder): the release's values (spec section 3).
DEFAULT_TRAIN_PARAMS = {"batch_size": 16, "base_lr": 1e-4, "num_warmup_steps": 2000, "max_to_keep_save": 12,
                        "checkpoint_per_hours": 1, "checkpoint_per_steps": 10000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptsan-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="source model directory (TF, HF or native)")
    parser.add_argument("--output", required=True, help="new native model directory (must not exist)")
    parser.add_argument("--add_extra_stage", type=int, default=0, help="extended layers to append")
    parser.add_argument("--num_spout", type=int, help="new spout width (re-initialises the spout network)")
    parser.add_argument("--freeze", choices=["spout"], action="append", default=[],
                        help="also list the spout network in ignore-params.json")
    parser.add_argument("--dtype", default="float32", choices=NATIVE_STORAGE_DTYPES, help="storage dtype")
    parser.add_argument("--seed", type=seed_flag, default=0, help="seed of the newly initialised parameters")
    return parser


def source_train_params(src: str, dst: str) -> dict[str, Any]:
    """SRC's train_params (or the defaults when SRC has no parameters.json) with output_dir = DST; a
    train_params that training would refuse (not an object, a field of the wrong type) is refused here, and
    the fields it lacks get the release's values, with a warning (training refused the converted model)."""
    from gptsan.checkpoint import native

    parameters = native.parameters_file(src)  # one step of a training run: the run's, in the folder above
    if not storage.exists(parameters):
        train_params = dict(DEFAULT_TRAIN_PARAMS)
    else:
        train_params = dict(TrainParams.check_fields(read_parameters_json(parameters)["train_params"], parameters))
        missing = [name for name in DEFAULT_TRAIN_PARAMS if name not in train_params]
        if missing:
            warn(f"{parameters}: train_params lacks {', '.join(missing)}; the converted model has the release's "
                 f"values ({', '.join(f'{name} {DEFAULT_TRAIN_PARAMS[name]}' for name in missing)})")
            train_params = {**DEFAULT_TRAIN_PARAMS, **train_params}
    train_params["output_dir"] = dst if storage.is_remote(dst) else os.path.abspath(dst)
    return train_params


def convert(src: str, dst: str, add_extra_stage: int = 0, num_spout: int | None = None,
            freeze_spout: bool = False, dtype: str = "float32", seed: int = 0) -> dict[str, list[str]]:
    """Write the converted model to `dst` (all or nothing); returns the name lists written beside it."""
    from gptsan.checkpoint import detect_format, load_flat, native
    from gptsan.checkpoint.staging import refuse_existing, staged_output
    from gptsan.convert.extend import add_extended_layers, resize_spout

    if add_extra_stage < 0:
        raise UserError(f"--add_extra_stage: expected a non-negative number of layers, got {add_extra_stage}")
    if dtype not in NATIVE_STORAGE_DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(NATIVE_STORAGE_DTYPES)}, got {dtype!r}")
    refuse_existing(dst)  # before the (possibly long) load
    train_params = source_train_params(src, dst)
    config, source = load_flat(src)
    if detect_format(src) == "hf":  # its config.json has no field for them: say what parameters.json gets
        warn(f"{src}: an HF config.json has no num_pallarelizm or train_mode; {dst} gets num_pallarelizm "
             f"{config.num_pallarelizm} (heads and experts not split over devices; GPTSAN-2.8B's release used 8) and "
             f"train_mode {config.train_mode} (the port's models are prefix-LMs: train them with gptsan-train --mode "
             "hybrid); edit its parameters.json to change them")
    new_config, flat = add_extended_layers(config, source, add_extra_stage, seed)
    if num_spout is not None:
        new_config, flat = resize_spout(new_config, flat, num_spout, seed)

    frozen = [name for name in source if not name.startswith(SPOUT_PREFIX)]
    if freeze_spout:
        frozen += [name for name in flat if name.startswith(SPOUT_PREFIX)]
    lists = {
        "ignore-params.json": sorted(frozen),
        "transformer-params.json": sorted(name for name in source if flat.get(name) is source[name]),
        "all-params.json": sorted(flat),
    }
    with staged_output(dst) as tmp:
        for file, names in lists.items():
            storage.write_text_atomic(storage.join(tmp, file), json.dumps(names, indent=1) + "\n")
        native.write(tmp, new_config, flat, train_params, dtype)  # parameters.json last
    return lists


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage.check_orbax_folder(args.output, "--output")
    storage.check_orbax_url(args.checkpoint, "--checkpoint")  # a native source is read through Orbax
    lists = convert(args.checkpoint, args.output, args.add_extra_stage, args.num_spout,
                    "spout" in args.freeze, args.dtype, args.seed)
    print(f"wrote {args.output}: {len(lists['all-params.json'])} parameters, "
          f"{len(lists['transformer-params.json'])} copied from {args.checkpoint}, "
          f"{len(lists['ignore-params.json'])} frozen")
    if len(lists["ignore-params.json"]) == len(lists["all-params.json"]):  # said only when training starts
        warn(f"{args.output}: ignore-params.json lists every parameter, so training with it will change nothing "
             "(--freeze spout with no --add_extra_stage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
