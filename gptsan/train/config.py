"""Training configuration: `train_params` from parameters.json and the run's flags, as frozen dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any

from gptsan.errors import UserError


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
    def from_dict(cls, values: dict[str, Any], source: str = "parameters.json") -> TrainParams:
        if not isinstance(values, dict):
            raise UserError(f"{source}: train_params must be a JSON object")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"{source}: train_params lacks {', '.join(missing)}")
        params = cls(**{name: values[name] for name in names})
        if not isinstance(params.output_dir, str) or not params.output_dir:
            raise UserError(f"{source}: train_params.output_dir must be a path")
        for name in ("batch_size", "max_to_keep_save"):
            if not isinstance(getattr(params, name), int) or getattr(params, name) < 1:
                raise UserError(f"{source}: train_params.{name} must be a positive integer")
        for name in ("num_warmup_steps", "checkpoint_per_steps"):
            if not isinstance(getattr(params, name), int) or getattr(params, name) < 0:
                raise UserError(f"{source}: train_params.{name} must be a non-negative integer")
        for name in ("base_lr", "checkpoint_per_hours"):
            if not isinstance(getattr(params, name), int | float) or getattr(params, name) < 0:
                raise UserError(f"{source}: train_params.{name} must be a non-negative number")
        if params.base_lr <= 0:
            raise UserError(f"{source}: train_params.base_lr must be positive")
        return params


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
