"""Publishing merged checkpoints to the Hugging Face Hub: the model card check and the one-commit upload.

Modules import huggingface_hub inside functions, so a merge that uploads nothing does not load it.
"""
