"""t5x_lite: multi-task instruction fine-tuning of T5-family encoder-decoders in JAX/Flax."""

__version__ = '0.1.0'
