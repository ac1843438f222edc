"""The training run, top to bottom: config -> inputs -> mesh -> state (restored or born sharded) ->
donated jitted step -> loop with metrics, checkpoints and preemption handling.

Resume order (initial_state, the only place it is written): an existing run's checkpoint in
train_params.output_dir -> the converted/initial model (parameters.json's own folder holding `params/`, as the
converter writes, or another model format gptsan.checkpoint reads) -> fresh initialisation (spec section 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

from gptsan import storage
from gptsan.data.pipeline import NoRecordFiles, count_records, make_dataset, process_share
from gptsan.data.schema import FEATURES
from gptsan.errors import UserError, warn
from gptsan.model.config import SHAPE_KEYS, ModelConfig, read_parameters_json
from gptsan.model.expert_parallel import check_expert_axis
from gptsan.model.params import abstract_params, expected_shapes, flatten, init_params
from gptsan.model.sharding import (
    batch_sharding,
    check_batch_split,
    make_mesh,
    model_axis_size,
    param_shardings,
    replicated,
    under_mesh,
)
from gptsan.tokenizer import with_vocabulary_size
from gptsan.train.accumulate import check_accumulate_steps, make_accumulating_train_step
from gptsan.train.checkpoint import Checkpointer
from gptsan.train.compiler_options import step_compiler_options
from gptsan.train.config import RunConfig, TrainParams
from gptsan.train.metrics import MetricsWriter, eval_summary, summarise
from gptsan.train.optim import make_optimizer
from gptsan.train.output_lock import cannot_write, output_dir_lock
from gptsan.train.precision import LossScale, compute_dtype
from gptsan.train.spout import check_spout_kind, one_hot_classes
from gptsan.train.state import TrainState, change_trainable_set, check_frozen_names, create_state, split_params
from gptsan.train.step import StepOptions, make_eval_step

PARAMETERS = "parameters.json"


# ---- inputs, checked before any step runs -------------------------------------------------------------
def read_ignore_list(path: str | None, config: ModelConfig) -> frozenset[str]:
    if not path:
        return frozenset()
    try:
        names = storage.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: ignore-parameters file not found") from None
    if not isinstance(names, list):
        raise UserError(f"{path}: expected a JSON list of parameter names")
    frozen = check_frozen_names(names, config, source=path)
    if frozen >= expected_shapes(config).keys():
        warn(f"{path}: lists every parameter, so training will change nothing")
    return frozen


def model_config(cfg: RunConfig, model_params: dict) -> ModelConfig:
    model_params = with_vocabulary_size(model_params, cfg.vocabulary)
    dtype = compute_dtype(cfg.use_bfloat16, cfg.use_mixed_precision)
    return ModelConfig.from_model_params(model_params, cfg.parameter_file, dtype=dtype, routing=cfg.routing,
                                       remat=cfg.remat)


def prepare_output_dir(output_dir: str, parameters: dict) -> None:
    """Create output_dir and write the run's parameters.json there (as the original did), or fail clearly.
    An output_dir that already holds another model's parameters.json is refused before it is overwritten
    (its checkpoints could not be resumed, and the other tools would read them as the new model)."""
    check_same_model(output_dir, parameters["model_params"])
    try:
        if not storage.is_remote(output_dir):
            os.makedirs(output_dir, exist_ok=True)
        text = json.dumps(parameters, indent=1)
        storage.write_text_atomic(storage.join(output_dir, "parameters.json"), text)
    except OSError as err:
        raise UserError(cannot_write(output_dir, err)) from None


@contextlib.contextmanager
def removed_if_nothing_saved(output_dir: str, made_here: bool):
    """A run that made output_dir and stops with an error or a Ctrl-C before any checkpoint is there (a bad
    starting model, a corrupt first record, a Ctrl-C while compiling) removes it again, so that a refused run
    leaves nothing (it used to leave parameters.json, tb/ and the lock file). A run's checkpoint folders, even
    a save in flight (`STEP.orbax-checkpoint-tmp`), keep it."""
    try:
        yield
    except BaseException:
        if made_here:
            with contextlib.suppress(OSError):
                if not any(name[:1].isdigit() for name in storage.folder_names(output_dir)):
                    fs, path = storage.filesystem(output_dir)
                    fs.rm(path, recursive=True)
        raise


def check_same_model(output_dir: str, model_params: dict) -> None:
    """Refuse when output_dir/parameters.json gives a parameter shape another value (num_pallarelizm or
    train_mode may change between runs)."""
    path = storage.join(output_dir, "parameters.json")
    try:
        existing = json.loads(storage.read_text(path)).get("model_params") or {}
    except (OSError, ValueError, AttributeError):  # none yet, or not ours to compare: it is rewritten
        return
    changed = [f"{key} {existing[key]} -> {model_params[key]}" for key in SHAPE_KEYS
               if key in existing and key in model_params and existing[key] != model_params[key]]
    if changed:
        raise UserError(f"train_params.output_dir {output_dir}: holds a run of another model "
                        f"({', '.join(changed)}); give a new output_dir")


RESUMED_SETTINGS = ("input_files", "input_data", "spout_vector", "mode", "seed", "processes", "cosine_steps")
SETTING_NAMES = {"cosine_steps": "max_training_step (adamw_cosine's length: the learning rate jumps)"}


def input_data(pattern: str) -> str:
    """What `pattern` matches, for the run record: files, bytes and a digest of their names and sizes, so that a
    resumed run whose glob now matches other files (one added, a corpus encoded anew under the same names) is
    told, as one whose --input_files changed is."""
    found = storage.glob_sizes(pattern)
    digest = hashlib.sha256("".join(f"{path}\t{size}\n" for path, size in found).encode()).hexdigest()[:8]
    return f"{len(found)} files, {sum(size for _, size in found)} bytes, #{digest}"


def records_read(saved_run: dict | None, data_position: int, batch_size: int) -> int:
    """Records (of all processes) the run read before the checkpoint it resumes from: what the checkpoint's run
    record says, else (checkpoints from before it said) `data_position` batches of the saving run's batch size.
    Counting records, not batches, lets a run resumed with another batch size read on from the same record (it
    used to skip `data_position` batches of the new size: records left out, or read twice)."""
    if not saved_run:
        return 0
    if isinstance(saved_run.get("records_read"), int):
        return saved_run["records_read"]
    saved_batch = ((saved_run.get("parameters") or {}).get("train_params") or {}).get("batch_size")
    return data_position * (saved_batch if isinstance(saved_batch, int) and saved_batch > 0 else batch_size)


def check_same_optimizer(output_dir: str, step: int, saved_run: dict, run_record: dict) -> None:
    """A checkpoint holds its optimizer's state, which another --optimizer or --clip_gradients cannot take up:
    resuming with either changed used to be reported as a corrupt checkpoint ("move N/ aside"), though every
    checkpoint of the run would fail alike. Checkpoints that do not record them (older ones) are not compared."""
    def shown(value) -> str:
        return "off" if value is None else str(value)

    changed = [f"--{key} {shown(saved_run[key])} (now {shown(run_record[key])})"
               for key in ("optimizer", "clip_gradients") if key in saved_run and saved_run[key] != run_record[key]]
    if changed:
        raise UserError(f"{output_dir}: its step-{step} checkpoint holds the optimizer state of "
                        f"{' and '.join(changed)}; resume with the flags that saved it, or give another output_dir")


def warn_of_changed_settings(output_dir: str, state: TrainState, saved_run: dict, run_record: dict,
                              batch_size: int) -> None:
    """One warning line when a resumed run reads other data or trains otherwise than the run that saved the
    checkpoint. Allowed (going on with a new corpus, say) but not silent: the data position then counts
    records of the data given now. Another number of processes splits the files otherwise (pipeline module
    docstring), so it reads other data too. Another --max_training_step of adamw_cosine stretches or shrinks its
    cosine, so the learning rate jumps at the resumed step. Settings a checkpoint does not record (older ones) are
    not compared."""
    keys = [key for key in RESUMED_SETTINGS if key in saved_run and saved_run[key] != run_record[key]]
    if "input_files" in keys:  # another glob: that its files differ goes without saying
        keys = [key for key in keys if key != "input_data"]
    changed = [f"{SETTING_NAMES.get(key, key)} {saved_run[key]!r} -> {run_record[key]!r}" for key in keys]
    if changed:
        records = records_read(saved_run, int(state.data_position), batch_size)
        position = f"from batch {records // batch_size}" if records % batch_size == 0 else f"after record {records}"
        warn(f"{output_dir}: resuming step {int(state.step)} with other settings than the run that saved it "
             f"({'; '.join(changed)}); reading goes on {position} of the data given now")


def warn_of_changed_trainable_set(output_dir: str, state: TrainState, saved_frozen: frozenset[str],
                                  frozen_names: frozenset[str]) -> None:
    """One warning line when a resumed run trains another set of parameters than the run that saved it (another
    --ignore_parameters): allowed, e.g. to unfreeze the backbone after training the extended layers."""
    if saved_frozen == frozen_names:
        return
    unfrozen, newly_frozen = len(saved_frozen - frozen_names), len(frozen_names - saved_frozen)
    effect = ("the newly trainable start with zero optimizer moments at the current learning rate, with no new "
              "warmup" if unfrozen else "the newly frozen keep their values and lose their optimizer moments")
    warn(f"{output_dir}: resuming step {int(state.step)} with another --ignore_parameters than the run that saved "
         f"it ({unfrozen} parameters newly trainable, {newly_frozen} newly frozen): {effect} (a new "
         "train_params.output_dir starts over, at step 0, from these parameters)")


def warn_of_ignored_prefixes(input_files: str, options: StepOptions, batch: dict) -> None:
    """One warning line when lm-mode training meets records with a bidirectional prefix (num_input > 1, as
    `gptsan-encode --mode hybrid` or `mlm` writes them): lm mode trains every position causally and ignores it.
    num_input counts the start token, so records without a prefix (`--mode lm`) have 1."""
    if options.mode == "lm" and np.any(batch["num_input"] > 1):
        warn(f"--input_files {input_files}: the records have prefixes (num_input > 1: encoded with --mode hybrid "
             "or mlm) but training runs in lm mode, which ignores them; give --mode hybrid to train them as "
             "prefixes")


def warn_of_folded_classes(input_files: str, options: StepOptions, num_spout: int, batch: dict) -> None:
    """onehot and half_onehot spouts give class i the vector one_hot(i mod C) (C = num_spout, or half of it),
    so classes C apart train the same vector; gptsan-generate refuses --spout C or more. One warning line when
    the first batch (a shuffled sample of the records) holds such an id."""
    classes = one_hot_classes(options.spout, num_spout)
    if not classes:
        return
    ids = np.asarray(batch["i"])
    outside = ids[(ids < 0) | (ids >= classes)]
    if outside.size:
        value = int(outside[0])
        warn(f"--spout_vector {options.spout}: --input_files {input_files} has class id {value} (in the first "
             f"batch), but the spout has {classes} classes: ids are taken mod {classes}, so it trains class "
             f"{value % classes}'s vector (encode class ids 0..{classes - 1}, or convert the model with a larger "
             "gptsan-convert --num_spout)")


def step_options(cfg: RunConfig, config: ModelConfig) -> StepOptions:
    mode = cfg.mode or ("lm" if config.train_mode == "lm" else "hybrid")
    if mode not in ("lm", "hybrid"):
        raise UserError(f"--mode: expected lm or hybrid, got {mode!r}")
    spout = check_spout_kind(cfg.spout_vector)
    if one_hot_classes(spout, config.num_spout) == 0:  # half of 1: every vector was noise, without a word
        raise UserError(f"--spout_vector {spout}: the model's num_spout {config.num_spout} leaves no classes (half "
                        "of it); give onehot, or convert the model with gptsan-convert --num_spout 2 or more")
    return StepOptions(mode=mode, spout=spout)


def local_batch_size(batch_size: int) -> int:
    """This process's rows of each global batch."""
    if batch_size % jax.process_count():
        raise UserError(f"train_params.batch_size {batch_size} must divide over {jax.process_count()} "
                        "processes")
    return batch_size // jax.process_count()


# ---- initial parameters ---------------------------------------------------------------------------------
def load_initial_params(model_dir: str, config: ModelConfig) -> dict | None:
    """The converted/initial model in the parameter file's folder (native `params/`, an original TF
    checkpoint or a Hugging Face folder), or None when that folder holds no model."""
    from gptsan.checkpoint import detect_format, load_model

    try:
        detect_format(model_dir)
    except UserError:
        return None
    _, params = load_model(model_dir)
    have = {name: tuple(np.shape(value)) for name, value in flatten(params).items()}
    if have != expected_shapes(config):
        raise UserError(f"{model_dir}: the model's parameters do not match {PARAMETERS}")
    return params


# ---- preemption -----------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM (preemption) or a first Ctrl-C: the loop saves a checkpoint after the current step and
    returns. A second Ctrl-C stops at once, without saving (KeyboardInterrupt, as Python's default).

    In a run of several processes all of them must stop after the same step (steps and saves are collective),
    and a signal may reach one process or reach them at different steps. There SIGTERM is left to JAX's
    preemption service, which tells every process and makes them agree on the step; a first Ctrl-C is passed to
    it as a SIGTERM to this process."""

    def __init__(self, processes: int = 1, progress: bool = True):
        self.shared = processes > 1
        self.line_start = "\n" if progress else ""  # the notice starts a line of its own after the progress bar
        self.requested = False  # save and stop after the current step
        self.interrupted = False  # a first Ctrl-C came
        self._previous = {}
        self._absl_level = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT)
            # A signal ignored when the run starts stays ignored: a run started in the background of a script
            # ignores Ctrl-C (the shell's doing), which is meant for the script's foreground command.
            self._previous = {signum: signal.signal(signum, self._handle) for signum in signals
                              if signal.getsignal(signum) is not signal.SIG_IGN}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                # The run is abandoned: a save in flight is cut short (its folder is removed when the next run
                # starts), and Orbax's report of that, with a traceback, would be noise before `interrupted`.
                absl_logger = logging.getLogger("absl")
                self._absl_level = absl_logger.level
                absl_logger.setLevel(logging.CRITICAL)
                raise KeyboardInterrupt
            self.interrupted = True
            print(f"{self.line_start}interrupt: saving a checkpoint after this step, then stopping (Ctrl-C again: "
                  "stop without saving)", file=sys.stderr, flush=True)
        self.request()

    def request(self) -> None:
        """Save and stop after the step in flight (several processes: after the step they agree on)."""
        if self.shared:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (called after every step, by every process)."""
        if self.shared:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, exc_type, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._absl_level is not None and exc_type is not KeyboardInterrupt:  # the run went on (a test)
            logging.getLogger("absl").setLevel(self._absl_level)


# ---- the run --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckedRun:
    """What run() reads and checks before it takes train_params.output_dir: every user mistake in the flags,
    parameters.json, the ignore list and the input files surfaces here, before a step is compiled."""
    parameters: dict  # parameters.json, with the vocabulary size the tokenizer has
    config: ModelConfig
    train: TrainParams
    frozen_names: frozenset[str]
    options: StepOptions
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    local_batch: int  # this process's rows of train_params.batch_size
    mesh: jax.sharding.Mesh
    on_corrupt: str  # "skip" or "stop"
    skip_warnings: set[str]  # one warning per skipped record in the whole run (check, reader, evals)


def check_run(cfg: RunConfig) -> CheckedRun:
    storage.check_gcs_endpoints(cfg.parameter_file, "--parameter_file")  # the model beside it: read by Orbax
    parameters = read_parameters_json(cfg.parameter_file)
    config = model_config(cfg, parameters["model_params"])
    train = TrainParams.from_dict(parameters["train_params"], cfg.parameter_file)
    storage.check_orbax_folder(train.output_dir, "train_params.output_dir")  # checkpoints: Orbax
    if not storage.is_remote(train.output_dir) and os.path.isfile(train.output_dir):  # was "[Errno 17] File exists"
        raise UserError(f"train_params.output_dir {train.output_dir}: is a file; give a folder")
    frozen_names = read_ignore_list(cfg.ignore_parameters, config)
    options = step_options(cfg, config)
    optimizer, schedule = make_optimizer(cfg.optimizer, train.base_lr, train.num_warmup_steps,
                                         clip_norm=cfg.clip_gradients, total_steps=cfg.max_training_step)
    local_batch = local_batch_size(train.batch_size)
    check_accumulate_steps(cfg.accumulate_steps, train.batch_size)
    if cfg.eval_batches < 1:
        raise UserError(f"--eval_batches: expected a positive count, got {cfg.eval_batches}")
    if cfg.log_every < 1:
        raise UserError(f"--log_every: expected a positive count, got {cfg.log_every}")
    if cfg.expert_parallelism < 1 or jax.device_count() % cfg.expert_parallelism:
        raise UserError(f"--expert_parallelism {cfg.expert_parallelism}: expected a positive divisor of the "
                        f"{jax.device_count()} devices")
    mesh = make_mesh(training_model_axis(cfg, config), cfg.expert_parallelism)
    check_batch_split(train.batch_size, dict(mesh.shape), f"{cfg.parameter_file}: train_params.batch_size")
    check_expert_axis(config.num_experts, cfg.expert_parallelism, f"--expert_parallelism {cfg.expert_parallelism}")
    on_corrupt = "skip" if cfg.skip_corrupt_records else "stop"
    skip_warnings: set[str] = set()
    check_records("--input_files", cfg.input_files, config, local_batch, on_corrupt, skip_warnings,
                  need=1)  # repeats to fill
    if cfg.eval_files:
        check_records("--eval_files", cfg.eval_files, config, local_batch, on_corrupt, skip_warnings,
                      need=local_batch)  # read once
    parameters["model_params"] = {**parameters["model_params"], "num_vocabulary": config.num_vocabulary}
    return CheckedRun(parameters, config, train, frozen_names, options, optimizer, schedule, local_batch, mesh,
                      on_corrupt, skip_warnings)


def training_model_axis(cfg: RunConfig, config: ModelConfig) -> int:
    """The mesh's model axis: num_pallarelizm where the devices allow it, or the largest part of it they do, with
    a warning (the release parameters.json's 8 on one GPU was an error before the first step). The expert axis
    divides the devices (check_run)."""
    devices = jax.device_count()
    model = model_axis_size(config.num_pallarelizm, devices // cfg.expert_parallelism)
    if model != config.num_pallarelizm and jax.process_index() == 0:
        leaves = f" left by --expert_parallelism {cfg.expert_parallelism}" if cfg.expert_parallelism > 1 else ""
        warn(f"{cfg.parameter_file}: model_params.num_pallarelizm {config.num_pallarelizm}: the {devices} devices"
             f"{leaves} cannot be split into a model axis of {config.num_pallarelizm}, so it is {model} (the same "
             f"model, split over fewer devices)")
    return model


def initial_state(cfg: RunConfig, checked: CheckedRun, checkpointer: Checkpointer, run_record: dict,
                  init: Callable[..., TrainState], abstract: TrainState, shardings: TrainState) -> TrainState:
    """The train state, born sharded, in the resume order: the run's latest checkpoint (split anew if the
    ignore list changed) -> the converted/initial model next to parameters.json -> fresh initialisation."""
    config, mesh, frozen_names = checked.config, checked.mesh, checked.frozen_names
    if checkpointer.latest_step() is not None:
        saved_run = checkpointer.saved_run()
        check_same_optimizer(checked.train.output_dir, checkpointer.latest_step(), saved_run, run_record)
        saved_frozen = frozenset(saved_run.get("ignore_parameters", frozen_names))
        if saved_frozen == frozen_names:
            state = checkpointer.restore(restore_target(abstract, shardings))
        else:  # restored as saved, then split anew (the optimizer state of the old split kept where it fits)
            saved_abstract = jax.eval_shape(functools.partial(init, frozen_names=saved_frozen),
                                            abstract_params(config))
            saved_shardings = state_shardings(saved_abstract, config, mesh, checked.optimizer, saved_frozen)
            saved_state = checkpointer.restore(restore_target(saved_abstract, saved_shardings))
            resplit = functools.partial(change_trainable_set, frozen_names=frozen_names, optimizer=checked.optimizer)
            state = jax.jit(resplit, out_shardings=shardings, donate_argnums=0)(saved_state)
        if jax.process_index() == 0:
            warn_of_changed_settings(checked.train.output_dir, state, saved_run, run_record,
                                     checked.train.batch_size)
            warn_of_changed_trainable_set(checked.train.output_dir, state, saved_frozen, frozen_names)
        return state
    model_dir = os.path.dirname(cfg.parameter_file) or "."
    if (params := load_initial_params(model_dir, config)) is not None:
        params = jax.device_put(params, param_shardings(config, mesh))
        return jax.jit(init, out_shardings=shardings)(params)
    if frozen_names and jax.process_index() == 0:  # a fine-tune whose model is elsewhere: it trained on silently
        warn(f"--ignore_parameters {cfg.ignore_parameters}: no model in {model_dir} (the folder of --parameter_file) "
             f"and no checkpoint in train_params.output_dir {checked.train.output_dir}: the {len(frozen_names)} "
             f"parameters it freezes stay as freshly initialised (--seed {cfg.seed})")
    return jax.jit(lambda: init(init_params(config, cfg.seed)), out_shardings=shardings)()


def run(cfg: RunConfig) -> TrainState:
    checked = check_run(cfg)
    config, train, options, mesh = checked.config, checked.train, checked.options, checked.mesh
    local_batch, on_corrupt, skip_warnings = checked.local_batch, checked.on_corrupt, checked.skip_warnings
    made_here = jax.process_index() == 0 and not storage.exists(train.output_dir)
    with output_dir_lock(train.output_dir, take=jax.process_index() == 0) as busy, \
            removed_if_nothing_saved(train.output_dir, made_here):
        if busy := first_problem(busy):  # the same error in every process
            raise UserError(busy)
        prepare_output_dir(train.output_dir, checked.parameters)

        # Shardings.
        loss_scale = LossScale.for_dtype(config.dtype)
        init = functools.partial(create_state, frozen_names=checked.frozen_names, optimizer=checked.optimizer,
                                 seed=cfg.seed, loss_scale=loss_scale)
        abstract = jax.eval_shape(init, abstract_params(config))
        shardings = state_shardings(abstract, config, mesh, checked.optimizer, checked.frozen_names)

        # State.
        checkpointer = Checkpointer(
            train.output_dir, max_to_keep=train.max_to_keep_save, every_steps=train.checkpoint_per_steps,
            every_hours=train.checkpoint_per_hours, async_save=cfg.async_checkpoints, processes=jax.process_count(),
            time_check_every=cfg.log_every)
        run_record = {"parameters": checked.parameters, "ignore_parameters": sorted(checked.frozen_names),
                      "spout_vector": cfg.spout_vector, "mode": options.mode, "seed": cfg.seed,
                      "input_files": cfg.input_files, "input_data": input_data(cfg.input_files),
                      "processes": jax.process_count(), "optimizer": cfg.optimizer,
                      "clip_gradients": cfg.clip_gradients,
                      "cosine_steps": cfg.max_training_step if cfg.optimizer == "adamw_cosine" else None}
        state = initial_state(cfg, checked, checkpointer, run_record, init, abstract, shardings)
        saved_run = checkpointer.saved_run() if checkpointer.latest_step() is not None else None
        first_record = records_read(saved_run, int(state.data_position), train.batch_size)
        resumed_step = int(state.step)

        def save(step: int) -> None:
            """A checkpoint of `step`, with the records read so far (every process reads local_batch a step)."""
            records = first_record + (step - resumed_step) * train.batch_size
            checkpointer.save(step, state, {**run_record, "records_read": records})

        # The step: pure, jitted, state donated.
        batch_shard = {name: batch_sharding(mesh) for name in FEATURES}
        compiler_options = step_compiler_options(mesh.devices.flat[0].platform, jax.local_device_count())
        train_step = jax.jit(under_mesh(make_accumulating_train_step(config, checked.optimizer, checked.schedule,
                                                                     options, cfg.accumulate_steps), mesh),
                             in_shardings=(shardings, batch_shard), out_shardings=(shardings, None),
                             donate_argnums=0, compiler_options=compiler_options)
        eval_step = jax.jit(under_mesh(make_eval_step(config.replace(routing=cfg.routing), options), mesh),
                            in_shardings=(shardings, batch_shard), compiler_options=compiler_options)

        def to_global(batch: dict) -> dict:
            return {name: jax.make_array_from_process_local_data(batch_shard[name], value)
                    for name, value in batch.items()}

        step = int(state.step)
        last_step = cfg.max_training_step if cfg.max_training_step > 0 else None
        if last_step is not None and step >= last_step and jax.process_index() == 0:  # a finished run, run again
            warn(f"train_params.output_dir {train.output_dir}: the run is at step {step} already, --max_training_step "
                 f"is {last_step}: nothing to train (give a larger --max_training_step to go on)")
        stream = make_dataset(cfg.input_files, config.num_contexts, local_batch, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              start_record=first_record // jax.process_count(), num_vocabulary=config.num_vocabulary,
                              on_corrupt=on_corrupt, warned=skip_warnings)
        writer = MetricsWriter(train.output_dir, enabled=jax.process_index() == 0, total_steps=last_step,
                               first_step=step, progress=cfg.progress)

        def evaluate() -> str | None:
            """Logs the eval metrics; returns the problem that stopped any process reading its eval batches (the same in
            every process)."""
            if not cfg.eval_files:
                return None
            batches = make_dataset(cfg.eval_files, config.num_contexts, local_batch, seed=0, shuffle=False,
                                   repeat=False, process_index=jax.process_index(),
                                   process_count=jax.process_count(), num_vocabulary=config.num_vocabulary,
                                   on_corrupt=on_corrupt, warned=skip_warnings)
            try:
                local, problem = list(itertools.islice(batches, cfg.eval_batches)), None
            except UserError as err:
                local, problem = [], str(err)
            if problem := first_problem(problem):
                return problem
            rows = [jax.device_get(eval_step(state, to_global(batch))) for batch in local[:agreed_count(len(local))]]
            if rows:
                writer.write(step, eval_summary(rows), "eval")
            return None

        # A bad record met while training: a checkpoint of the last good step is saved, then every process stops
        # with the error. With several processes the one that met it asks for a stop at an agreed step, as a
        # preemption does, and until then takes part in the steps with a batch that has no targets.
        data_error = eval_error = None
        warned_of_divergence = False
        idle_batch = targetless_batch(local_batch, config.num_contexts)
        with StopFlag(jax.process_count(), cfg.progress) as stop, checkpointer.errors_abandon_the_save_in_flight():
            interval_start, interval_steps, interval_applied = time.perf_counter(), 0, []
            first_step, started = step, time.perf_counter()
            while last_step is None or step < last_step:
                try:
                    batch = idle_batch if data_error else next(stream)
                except UserError as err:
                    data_error, batch = str(err), idle_batch
                    stop.request()
                    if not stop.shared:
                        break
                if step == first_step and jax.process_index() == 0:
                    warn_of_ignored_prefixes(cfg.input_files, options, batch)
                    warn_of_folded_classes(cfg.input_files, options, config.num_spout, batch)
                state, metrics = train_step(state, to_global(batch))
                step += 1
                interval_steps += 1
                interval_applied.append(metrics["update_applied"])  # read at the log step (no wait per step)
                writer.advance()
                stopping = stop.reached(step)  # a stop's last step is logged too, as the run's last step is
                if step % cfg.log_every == 0 or step == last_step or stopping:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - interval_start
                    tokens = interval_steps * train.batch_size * config.num_contexts
                    skipped = interval_steps - int(np.sum(jax.device_get(interval_applied)))
                    row = summarise(metrics, tokens / max(elapsed, 1e-9), skipped)
                    writer.write(step, row)
                    # float16 skips steps to find its loss scale; at the scale's floor they mean divergence too
                    floored = row["skipped"] and row["loss_scale"] <= 1.0
                    if skipped and (not loss_scale.dynamic or floored) and not warned_of_divergence \
                            and jax.process_index() == 0:
                        warn_of_skipped_steps(step, skipped, interval_steps, config.dtype, train.output_dir)
                        warned_of_divergence = True
                    interval_start, interval_steps, interval_applied = time.perf_counter(), 0, []
                if cfg.eval_every and step % cfg.eval_every == 0:
                    eval_error = evaluate()
                if checkpointer.due(step):
                    save(step)
                    if not cfg.eval_every:
                        eval_error = evaluate()
                    writer.flush()
                if stopping or eval_error:
                    break
            if step not in (checkpointer.last_saved_step, first_step):  # the final save (unless saved, or no step)
                save(step)
                if not cfg.eval_every and not stop.requested and not eval_error:  # a preempted run leaves at once
                    eval_error = evaluate()
            checkpointer.close()
            writer.close()
        # Every process is here after the same step; eval_error is the same in all, data_error in the one that met it
        # (the run may also have reached its last step before the agreed stop).
        if problem := eval_error or first_problem(data_error):
            saved = f"saved step {step} in {train.output_dir} and stopped" if step != first_step else \
                "stopped before its first step"
            raise UserError(f"{problem}; the run {saved} (mend or remove the file, then run the same command to go on)")
        if step != first_step and jax.process_index() == 0:
            print(report_of_run(first_step, step, time.perf_counter() - started, stop.requested, train.output_dir),
                  file=sys.stderr)
        return state


def report_of_run(first_step: int, step: int, seconds: float, stopped: bool, output_dir: str) -> str:
    """The run's last line: the steps it trained, and where the last is saved (a log without the progress
    bar ended with the last metrics row, which does not say whether the run finished or was stopped)."""
    trained = f"steps {first_step + 1}-{step} in {seconds:.0f} s; step {step} saved in {output_dir}"
    if stopped:
        return f"training: stopped on request after step {step} ({trained}): run the same command to go on"
    return f"training: {trained}"


def warn_of_skipped_steps(step: int, skipped: int, steps: int, dtype: str, output_dir: str) -> None:
    """The first time float32 or bfloat16 training skips a step, or float16 training with its loss scale down
    to 1: the gradients were not finite, so the update was left out (parameters kept). With no loss scale
    (left) to lower, the run is diverging; it used to go on skipping without a word (a mini model at lr 1e30
    skipped every step after the first)."""
    why = "its loss scale is down to 1" if dtype == "float16" else f"{dtype} training has no loss scale to lower"
    warn(f"step {step}: {skipped} of the last {steps} steps had non-finite gradients and were skipped (parameters "
         f"kept); {why}, so the run is diverging: lower base_lr or clip with --clip_gradients (later skips are "
         f"counted in {storage.join(output_dir, 'metrics.jsonl')}'s skipped_steps)")


def targetless_batch(batch_size: int, num_contexts: int) -> dict[str, np.ndarray]:
    """A batch with no targets (every one -1: nothing to the cross-entropy or z-loss), for a process whose data
    stopped, in the few steps until every process stops. Its tokens still pass the routers (their aux loss and
    expert capacity), as padding does."""
    return {"x": np.zeros((batch_size, num_contexts), np.int32), "y": np.full((batch_size, num_contexts), -1, np.int32),
            "i": np.zeros(batch_size, np.int32), "num_input": np.zeros(batch_size, np.int32)}


def check_records(flag: str, pattern: str, config: ModelConfig, local_batch: int, on_corrupt: str,
                  skip_warnings: set[str], need: int) -> None:
    """Reads the first `local_batch` records of this process's share of `pattern`: a bad one, or fewer than
    `need`, stops every process with the same message. (A process with no training records used to loop
    over its empty files forever, and its peers waited for it in their first step.)"""
    problem = None
    try:
        if not pattern:
            raise UserError(f"{flag}: empty; give a glob of tfrecord files")
        source = process_share(pattern, config.num_contexts, process_index=jax.process_index(),
                               process_count=jax.process_count(), num_vocabulary=config.num_vocabulary,
                               on_corrupt=on_corrupt, warned=skip_warnings)
        found = count_records(source, local_batch)
        if found < need:
            problem = (f"{flag} {pattern}: {found} record{'s' * (found != 1)} in {source.describe()}, expected at "
                       f"least {need}" + (" (one batch)" if need > 1 else ""))
    except NoRecordFiles as err:  # the same words for --input_files and --eval_files: say which
        problem = f"{flag} {err}"
    except UserError as err:
        problem = str(err)
    if problem := first_problem(problem):
        raise UserError(problem)


def first_problem(problem: str | None) -> str | None:
    """The first process's `problem` among all that have one, in every process (None when none has)."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    size = 2048
    message = (f"process {jax.process_index()}: {problem}".encode()[:size] if problem else b"").ljust(size, b"\0")
    messages = multihost_utils.process_allgather(np.frombuffer(message, np.uint8))
    found = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in np.asarray(messages)]
    return next((text for text in found if text), None)


def agreed_count(count: int) -> int:
    """The fewest of every process's `count`: steps are collective, so each process runs as many as the others
    (eval files split unevenly over the processes give them different numbers of batches)."""
    if jax.process_count() == 1:
        return count
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(count))))


def restore_target(abstract: TrainState, shardings: TrainState) -> TrainState:
    """The restore target: each leaf's shape and dtype with the sharding it is to be read into."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  shardings)


def state_shardings(abstract: TrainState, config: ModelConfig, mesh, optimizer: optax.GradientTransformation,
                    frozen_names: frozenset[str]):
    """NamedShardings for every leaf of the train state: parameters (and their optimizer slots) from the
    logical-axis rules, everything else replicated."""
    trainable, frozen = split_params(param_shardings(config, mesh), frozen_names)
    opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract.opt_state, trainable,
                                      transform_non_params=lambda _: replicated(mesh))
    rep = replicated(mesh)
    return abstract.replace(
        step=rep, params=trainable, frozen=frozen, opt_state=opt_state, rng=rep,
        loss_scale=jax.tree_util.tree_map(lambda _: rep, abstract.loss_scale), data_position=rep)
