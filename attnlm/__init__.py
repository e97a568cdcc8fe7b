"""attnlm: train, sample and study small causal Transformer language models."""

__version__ = "0.1.0"
