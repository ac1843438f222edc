"""The GPTSAN model in Flax (Linen)."""

from gptsan.model.config import ModelConfig, load_config
from gptsan.model.params import abstract_params, expected_shapes, flatten, init_params, unflatten
from gptsan.model.transformer import GPTSAN, KVCache, Output

__all__ = ["GPTSAN", "KVCache", "ModelConfig", "Output", "abstract_params", "expected_shapes", "flatten",
           "init_params", "load_config", "unflatten"]
