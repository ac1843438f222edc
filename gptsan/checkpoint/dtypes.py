"""The dtypes each checkpoint format stores, in a module of their own: the command-line parsers offer them as
`--dtype` choices without loading the formats' modules (JAX and Flax: seconds, for a `--help`)."""

NATIVE_STORAGE_DTYPES = ("float32", "bfloat16")  # Orbax, as the training state keeps them
FLOAT_STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # safetensors and TF checkpoints (gptsan-export)
