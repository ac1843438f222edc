"""The model's configuration: GPTSAN's `model_params`, read once into a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gptsan.errors import UserError, warn_once

DEFAULT_NUM_SPOUT = 128
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ROUTING_MODES = ("capacity", "dropless")
REMAT_POLICIES = ("none", "full", "dots")

# parameters.json `model_params` keys that this suite reads (the original's names, typos included).
_REQUIRED_KEYS = (
    "num_contexts",
    "num_switch_layers",
    "num_ext_layers",
    "num_hidden",
    "num_header",
    "num_experts",
    "num_vocabulary",
)
SHAPE_KEYS = (*_REQUIRED_KEYS, "num_spout")  # the model_params that set parameter names and shapes
MODEL_PARAMS_KEYS = (*SHAPE_KEYS, "num_pallarelizm", "train_mode")  # all that the original's model_params hold


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from `model_params`) plus run-time choices that are not stored in parameters.json."""

    num_contexts: int
    num_switch_layers: int
    num_ext_layers: int
    num_hidden: int
    num_header: int
    num_experts: int
    num_vocabulary: int
    num_spout: int = DEFAULT_NUM_SPOUT
    num_pallarelizm: int = 1
    train_mode: str = "lm"
    # Run-time choices (never written to parameters.json).
    dtype: str = "float32"  # compute dtype; parameters stay float32
    routing: str = "dropless"  # "capacity": original grouped capacity; "dropless": no token dropped
    group_size: int = 1024  # routing group size (tokens over batch x length) for "capacity"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    router_jitter: float = 0.01  # multiplicative U(1-j, 1+j) on the router input, training only
    layer_norm_eps: float = 1e-5
    remat: str = "none"  # activation rematerialisation around each sub-layer: none | full | dots

    def __post_init__(self):
        positive = (
            "num_contexts",
            "num_hidden",
            "num_header",
            "num_experts",
            "num_vocabulary",
            "num_spout",
            "num_pallarelizm",
            "group_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model_params.{name} must be a positive integer, got {json_text(value)}")
        for name in ("num_switch_layers", "num_ext_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"model_params.{name} must be a non-negative integer, got {json_text(value)}")
        if self.num_layers == 0:
            raise UserError("model_params: num_switch_layers + num_ext_layers must be at least 1")
        if self.num_hidden % self.num_header:
            raise UserError(
                f"model_params.num_hidden ({self.num_hidden}) must be divisible by "
                f"num_header ({self.num_header})"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.routing not in ROUTING_MODES:
            raise UserError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {self.routing!r}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.train_mode not in ("lm", "hybrid", "mlm"):
            raise UserError(f"model_params.train_mode must be lm, hybrid or mlm, got {json_text(self.train_mode)}")

    # Derived sizes.
    @property
    def num_layers(self) -> int:
        return self.num_switch_layers + self.num_ext_layers

    @property
    def head_dim(self) -> int:
        return self.num_hidden // self.num_header

    @property
    def num_ff_hidden(self) -> int:
        """Expert FFN width (8d)."""
        return 8 * self.num_hidden

    @property
    def num_ext_hidden(self) -> int:
        """Extended-layer FFN width (4d)."""
        return 4 * self.num_hidden

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # parameters.json.
    @classmethod
    def from_model_params(cls, model_params: dict[str, Any], source: str = "parameters.json",
                          **runtime: Any) -> ModelConfig:
        if not isinstance(model_params, dict):
            raise UserError(f"{source}: model_params must be a JSON object")
        missing = [key for key in _REQUIRED_KEYS if key not in model_params]
        if missing:
            raise UserError(f"{source}: model_params lacks {', '.join(missing)}")
        unknown = [key for key in model_params if key not in MODEL_PARAMS_KEYS]
        if unknown:  # a typo (num_expert) would otherwise leave a setting at its default without a word
            warn_once(f"{source}: model_params {', '.join(map(json_text, unknown))} not read (GPTSAN's keys: "
                      f"{', '.join(MODEL_PARAMS_KEYS)})")
        # 64.0 is read as 64, as config.json's sizes are (gptsan/checkpoint/hf.py)
        values = {key: whole_number(model_params[key]) for key in MODEL_PARAMS_KEYS if key in model_params}
        if "num_spout" not in model_params:
            warn_once(f"{source}: model_params.num_spout missing; using {DEFAULT_NUM_SPOUT}")
        values.update(runtime)
        try:
            return cls(**values)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None

    def to_model_params(self) -> dict[str, Any]:
        return {
            "num_contexts": self.num_contexts,
            "num_switch_layers": self.num_switch_layers,
            "num_ext_layers": self.num_ext_layers,
            "num_hidden": self.num_hidden,
            "num_header": self.num_header,
            "num_experts": self.num_experts,
            "num_pallarelizm": self.num_pallarelizm,
            "num_spout": self.num_spout,
            "num_vocabulary": self.num_vocabulary,
            "train_mode": self.train_mode,
        }

    # Hugging Face GPTSanJapanese config.json.
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json", **runtime: Any) -> ModelConfig:
        try:
            d_model = int(hf["d_model"])
            config = cls(
                num_contexts=int(hf["max_position_embeddings"]),
                num_switch_layers=int(hf["num_switch_layers"]),
                num_ext_layers=int(hf["num_ext_layers"]),
                num_hidden=d_model,
                num_header=int(hf["num_heads"]),
                num_experts=int(hf["num_experts"]),
                num_vocabulary=int(hf["vocab_size"]),
                num_spout=int(hf.get("d_spout", DEFAULT_NUM_SPOUT)),
                layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                **runtime,
            )
        except KeyError as err:
            raise UserError(f"{source}: missing field {err.args[0]!r}") from None
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
        for key, want in (("d_ff", config.num_ff_hidden), ("d_ext", config.num_ext_hidden)):
            if key in hf and int(hf[key]) != want:
                raise UserError(f"{source}: {key} is {hf[key]}, GPTSAN needs {want} for d_model {d_model}")
        return config

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["GPTSanJapaneseForConditionalGeneration"],
            "model_type": "gptsan-japanese",
            "d_model": self.num_hidden,
            "d_ff": self.num_ff_hidden,
            "d_ext": self.num_ext_hidden,
            "d_spout": self.num_spout,
            "num_switch_layers": self.num_switch_layers,
            "num_ext_layers": self.num_ext_layers,
            "num_layers": self.num_layers,
            "num_heads": self.num_header,
            "num_experts": self.num_experts,
            # The port drops a row's tokens beyond expert_capacity per expert (128 in GPTSAN-2.8B's config), which
            # gptsan's default (dropless) routing never does: room for a whole context drops none, so the two give
            # the same logits at every input length.
            "expert_capacity": self.num_contexts,
            "vocab_size": self.num_vocabulary,
            "max_position_embeddings": self.num_contexts,
            "layer_norm_epsilon": self.layer_norm_eps,
            "dropout_rate": 0.0,
            "router_bias": False,
            "router_jitter_noise": 0.0,
            "router_dtype": "float32",
            "router_ignore_padding_tokens": False,
            "output_router_logits": False,
            "initializer_factor": 0.002,
            "pad_token_id": self.num_vocabulary - 5,  # the port's <|separator|> (35995 of 36,000)
            "separator_token_id": self.num_vocabulary - 2,
            "eos_token_id": self.num_vocabulary - 1,
            "use_cache": True,
            "torch_dtype": "float32",
        }


def json_text(value: Any) -> str:
    """A value read from a JSON file, as that file spells it (null, true, "4"), for messages."""
    return json.dumps(value, ensure_ascii=False)


def whole_number(value: Any) -> Any:
    """An integral float (64.0) as the int it spells; any other value unchanged, for validation to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def read_parameters_json(path: str | Path) -> dict[str, Any]:
    """Read a parameters.json (local or gs://) into a dict with `model_params` and `train_params`."""
    from gptsan.storage import read_json

    try:
        data = read_json(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: parameter file not found") from None
    if not isinstance(data, dict) or "model_params" not in data:
        raise UserError(f"{path}: expected a JSON object with model_params (and train_params)")
    data.setdefault("train_params", {})
    return data


def load_config(path: str | Path, **runtime: Any) -> ModelConfig:
    """ModelConfig from a parameters.json file."""
    return ModelConfig.from_model_params(read_parameters_json(path)["model_params"], str(path), **runtime)
