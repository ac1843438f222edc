"""`gptsan-train` / run_training.py: GPTSAN's training flags -> RunConfig -> gptsan.train.loop.run."""

from __future__ import annotations

import argparse
import os

from gptsan.errors import UserError, cli_main
from gptsan.memory import keep_freed_memory
from gptsan.seed import seed_flag
from gptsan.train.config import DEFAULT_CLIP_NORM, OPTIMIZERS, SPOUT_KINDS, RunConfig
from gptsan.train.distributed import initialize_processes

# JAX, Optax and the training modules (seconds of imports) are imported inside the functions, under cli_main, so
# a Ctrl-C while they load ends in `interrupted`, not a traceback.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptsan-train", description="Train a GPTSAN model on tfrecords.")
    p.add_argument("--input_files", required=True, help="tfrecord glob, local or gs://")
    p.add_argument("--parameter_file", required=True,
                   help="parameters.json; its folder may hold the converted model (params/) to start from")
    p.add_argument("--ignore_parameters", default="", help="ignore-params.json: names not to train")
    p.add_argument("--spout_vector", default="none", choices=SPOUT_KINDS,
                   help="spout input built from the record's class id `i`")
    p.add_argument("--tpu_nodes", default="",
                   help="train on the TPUs of this TPU VM (any value; pods: jax.distributed is initialised). "
                        "The old remote TPU-node architecture is gone, so no node name is contacted.")
    p.add_argument("--use_bfloat16", action="store_true", help="bfloat16 compute")
    p.add_argument("--use_mixed_precision", action="store_true",
                   help="float16 compute with dynamic loss scaling")
    p.add_argument("--clip_gradients", nargs="?", type=float, const=DEFAULT_CLIP_NORM, default=None,
                   help=f"clip gradients by global norm (default norm {DEFAULT_CLIP_NORM} when no value)")
    p.add_argument("--max_training_step", type=int, default=-1, help="stop after this step (<=0: never)")
    p.add_argument("--vocabulary", default="",
                   help="ja-swe36k.txt (its line count) or a SentencePiece .model: num_vocabulary")
    p.add_argument("--seed", type=seed_flag, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--skip_corrupt_records", action="store_true",
                   help="skip records that fail their checksums, one warning each (default: stop at the first)")
    p.add_argument("--eval_files", default="", help="tfrecord glob for an eval loss at each checkpoint")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--mode", choices=("lm", "hybrid"), default=None,
                   help="hybrid: the record's num_input is the prefix-LM prefix (default: train_mode)")
    p.add_argument("--routing", choices=("capacity", "dropless"), default="capacity",
                   help="capacity: the original's (cf 1.25); dropless: no token dropped (both: router jitter)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam: the original (no bias correction, inverse-sqrt schedule); adamw_cosine")
    p.add_argument("--expert_parallelism", type=int, default=1, help="size of the mesh's expert axis")
    p.add_argument("--coordinator_address", default=os.environ.get("GPTSAN_COORDINATOR_ADDRESS", ""),
                   help="multi-host: jax.distributed coordinator host:port")
    p.add_argument("--num_processes", type=int, default=environment_int("GPTSAN_NUM_PROCESSES", 0))
    p.add_argument("--process_id", type=int, default=environment_int("GPTSAN_PROCESS_ID", -1))
    p.add_argument("--accumulate_steps", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation; must divide the batch)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="recompute activations in the backward pass: full (keep layer inputs) or dots "
                        "(also keep matmul outputs)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def environment_int(name: str, default: int) -> int:
    """A flag's default from the environment variable `name` (`default` when unset); a value that is not an
    integer is one error line (it was a ValueError traceback from every call, `--help` included)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}: expected an integer, got {value!r}") from None


def select_devices(args: argparse.Namespace) -> None:
    """TPU VM / multi-host set-up, before the first JAX computation."""
    import jax

    if args.tpu_nodes:
        jax.config.update("jax_platforms", "tpu")
        try:
            if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a pod slice: one process per host
                initialize_processes()
            jax.devices("tpu")
        except RuntimeError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"--tpu_nodes: no TPU found on this machine ({reason})") from None
    elif args.coordinator_address:
        if args.num_processes < 1 or args.process_id < 0:
            raise UserError("--coordinator_address: also give --num_processes and --process_id")
        initialize_processes(args.coordinator_address, args.num_processes, args.process_id)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    select_devices(args)
    from gptsan.train.loop import run

    run(RunConfig(
        parameter_file=args.parameter_file, input_files=args.input_files,
        ignore_parameters=args.ignore_parameters or None, spout_vector=args.spout_vector,
        use_bfloat16=args.use_bfloat16, use_mixed_precision=args.use_mixed_precision,
        clip_gradients=args.clip_gradients, max_training_step=args.max_training_step,
        vocabulary=args.vocabulary or None, seed=args.seed, log_every=args.log_every,
        eval_files=args.eval_files or None, eval_batches=args.eval_batches, mode=args.mode,
        skip_corrupt_records=args.skip_corrupt_records,
        routing=args.routing, optimizer=args.optimizer, expert_parallelism=args.expert_parallelism,
        accumulate_steps=args.accumulate_steps, remat=args.remat,
        progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
