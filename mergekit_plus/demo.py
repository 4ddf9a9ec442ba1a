"""Build the small checkpoints that the demo recipes in configs/examples merge.

A tiny Llama base and three "fine-tunes" (the base plus seeded deltas, each on a different subset of
its tensors, so that their task vectors overlap only in part), all written by `transformers`
`save_pretrained`, with a character-level tokenizer. Needs the `dev` extra (transformers).

    python -m mergekit_plus.demo build/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
FINE_TUNES = {"ft-alpha": 1, "ft-beta": 2, "ft-gamma": 3}


def build_tokenizer(folder: Path):
    """Save a character-level tokenizer that AutoTokenizer loads; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_demo(folder: Path, *, hidden_size: int = 64, layers: int = 2) -> list[Path]:
    """Write base/ and one folder per fine-tune under `folder`; return the folders written."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=hidden_size,
        intermediate_size=hidden_size * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    written = []
    base_folder = folder / "base"
    base.save_pretrained(base_folder)
    build_tokenizer(base_folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=16).save_pretrained(base_folder)
    written.append(base_folder)

    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    for name, seed in FINE_TUNES.items():
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor_name, parameter in base.named_parameters():
                original = base_state[tensor_name]
                # Each fine-tune moves about half of the entries, with a scale of 5% of the tensor's spread.
                delta = torch.randn(original.shape, generator=generator) * (0.05 * float(original.float().std()) + 1e-3)
                keep = torch.rand(original.shape, generator=generator) < 0.5
                parameter.copy_(original + delta * keep)
        target = folder / name
        base.save_pretrained(target)
        build_tokenizer(target)
        written.append(target)
    with torch.no_grad():
        for tensor_name, parameter in base.named_parameters():
            parameter.copy_(base_state[tensor_name])
    (folder / "README.txt").write_text(
        "Checkpoints built by `python -m mergekit_plus.demo`; the recipes in configs/examples merge them.\n",
        encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps([str(p.name) for p in written]) + "\n", encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("build/demo"),
                        help="where to write the checkpoints (default: build/demo)")
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    for path in build_demo(args.folder):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
