"""mergekit_plus: streaming merges of Hugging Face checkpoints from a YAML recipe."""

__version__ = "0.1.0"
