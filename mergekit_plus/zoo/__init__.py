"""The model zoo: small checkpoints really fine-tuned on the CPU from a shared base, and their evaluation.

`merge zoo build` writes it; `merge eval` scores a model on its tasks. See docs/zoo.md.
"""
