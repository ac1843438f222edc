"""Training configuration: `train_params` from parameters.json and the run's flags, as frozen dataclasses."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from gptsan.errors import UserError
from gptsan.model.config import json_text, whole_number


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """parameters.json `train_params` (spec section 3)."""

    output_dir: str
    batch_size: int
    base_lr: float
    num_warmup_steps: int
    max_to_keep_save: int
    checkpoint_per_hours: float
    checkpoint_per_steps: int

    @classmethod
    def from_dict(cls, values: Any, source: str = "parameters.json") -> TrainParams:
        """All of train_params, each field checked (`check_fields`)."""
        cls.check_fields(values, source)
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"{source}: train_params lacks {', '.join(missing)}")
        # A leading ~ is the home folder, for every writer alike: fsspec expanded it (parameters.json went to
        # /root/x) while Orbax and the lock took it literally (checkpoints in ./~/x).
        fields = {name: whole_number(values[name]) if name in INTEGER_FIELDS else values[name] for name in names}
        return cls(**{**fields, "output_dir": os.path.expanduser(values["output_dir"])})

    @staticmethod
    def check_fields(values: Any, source: str = "parameters.json") -> dict[str, Any]:
        """`values` if it is a JSON object whose train_params fields, those it has, hold what training needs.
        Fields may be missing here: gptsan-plan reads only batch_size, gptsan-convert copies what the source
        has; training (`from_dict`) then requires them all."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: train_params must be a JSON object, got {json_text(values)}")
        for name, (is_valid, expected) in TRAIN_PARAMS_RULES.items():
            if name in values and not is_valid(values[name]):
                raise UserError(f"{source}: train_params.{name} must be {expected}, got {json_text(values[name])}")
        return values


LARGEST_FLOAT32 = 3.4028234663852886e38  # the learning rate is a float32 in the step
LARGEST_STEP = 2**31 - 1  # steps count in int32 in the step


def _is_integer(value: Any) -> bool:
    """An int, or a float that spells one (16.0), as model_params and config.json sizes are read."""
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# train_params field -> (test of a value, what the error says a value must be).
INTEGER_FIELDS = ("batch_size", "num_warmup_steps", "max_to_keep_save", "checkpoint_per_steps")
TRAIN_PARAMS_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "output_dir": (lambda value: isinstance(value, str) and value != "", "a path"),
    "batch_size": (lambda value: _is_integer(value) and value >= 1, "a positive integer"),
    "base_lr": (lambda value: _is_number(value) and 0 < value <= LARGEST_FLOAT32, "a positive float32 number"),
    "num_warmup_steps": (lambda value: _is_integer(value) and 0 <= value <= LARGEST_STEP,
                         f"an integer from 0 to {LARGEST_STEP}"),
    "max_to_keep_save": (lambda value: _is_integer(value) and value >= 1, "a positive integer"),
    "checkpoint_per_hours": (lambda value: _is_number(value) and value >= 0, "a non-negative number"),
    "checkpoint_per_steps": (lambda value: _is_integer(value) and value >= 0, "a non-negative integer"),
}


# RunConfig.optimizer's and .spout_vector's choices and the --clip_gradients value (gptsan/train/optim.py,
# gptsan/train/spout.py), here, where the command line's parser reads them without loading JAX.
OPTIMIZERS = ("adam", "adamw_cosine")
DEFAULT_CLIP_NORM = 0.01
SPOUT_KINDS = ("none", "uniform", "stateless_uniform", "onehot", "half_onehot")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: GPTSAN's run_training.py flags plus this suite's additions."""

    parameter_file: str
    input_files: str
    ignore_parameters: str | None = None
    spout_vector: str = "none"
    use_bfloat16: bool = False
    use_mixed_precision: bool = False
    clip_gradients: float | None = None  # global-norm clip; None = no clipping
    max_training_step: int = -1  # <= 0: train until stopped
    vocabulary: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_files: str | None = None
    eval_every: int = 0  # 0: evaluate at each checkpoint save
    eval_batches: int = 4
    skip_corrupt_records: bool = False  # records failing their checksums: skipped with a warning, or stop the run
    mode: str | None = None  # lm | hybrid; None: from model_params.train_mode
    routing: str = "capacity"
    optimizer: str = "adam"
    expert_parallelism: int = 1
    accumulate_steps: int = 1  # micro-batches per optimizer step (gptsan/train/accumulate.py)
    remat: str = "none"  # none | full | dots (ModelConfig.remat)
    progress: bool = True
    async_checkpoints: bool = True
