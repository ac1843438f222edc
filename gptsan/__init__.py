"""gptsan: the GPTSAN Switch-Transformer suite on JAX."""

__version__ = "0.1.0"
