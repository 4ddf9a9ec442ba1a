"""Build the benchmark checkpoints: a 0.5B Llama base model and three fine-tunes of it.

The base is a randomly initialised ``LlamaForCausalLM`` in bfloat16. ``--layers`` and
``--vocab-size`` shrink it for tools that cannot merge the 0.5B set in the memory at hand: with
2 layers and 8000 tokens it has 0.044B parameters at the same width. Each fine-tune is the
base plus seeded Gaussian noise, N(0, (0.01 * rms(W))^2) per tensor W, rounded back to
bfloat16. The noise scale is relative to the RMS rather than the standard deviation so that
the RMSNorm weights, which start as exact ones with zero spread, also change. A relative
scale of 0.01 is 1.3 to 2.6 bfloat16 ulps at the tensor's RMS, so about 83% of the elements
of a fine-tune differ from the base, as in a real fine-tune. With 0.001 most deltas would
round away to zero.

Every model is written by ``save_pretrained`` in 400 MB shards (three per 0.5B model). Real 7B
models ship as three or four shards of up to 5 GB, so the readers are exercised on sharded
input. A small word-level tokenizer is saved beside each model so that both merge tools copy
tokenizer files as they would for a real model.

The script is deterministic: the same seeds and library versions produce byte-identical
files. It keeps at most two copies of the model in memory (about 2 GB) and builds one model
at a time. It skips the build when ``BUILD_INFO.json`` in the checkpoint folder matches the
current settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LOG = logging.getLogger(__name__)

BASE_SEED = 0
FINE_TUNE_SEEDS = {"ft1": 101, "ft2": 102, "ft3": 103}
RELATIVE_NOISE = 0.01
SHARD_SIZE = "400MB"

MODEL_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def model_config(layers: int, vocab_size: int) -> dict:
    return {**MODEL_CONFIG, "num_hidden_layers": layers, "vocab_size": vocab_size}


def build_info(layers: int, vocab_size: int) -> dict:
    """Return the settings that determine the files. A change in any of them forces a rebuild."""
    import transformers

    return {
        "model_config": model_config(layers, vocab_size),
        "base_seed": BASE_SEED,
        "fine_tune_seeds": FINE_TUNE_SEEDS,
        "relative_noise": RELATIVE_NOISE,
        "shard_size": SHARD_SIZE,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Make a tiny word-level tokenizer. Its vocabulary size does not matter to a merge."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_base(out_dir: Path, layers: int, vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(BASE_SEED)
    config = LlamaConfig(**model_config(layers, vocab_size))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    make_tokenizer().save_pretrained(out_dir)
    return model


def perturbed_state_dict(model: LlamaForCausalLM, seed: int) -> dict[str, torch.Tensor]:
    """Return the model's weights plus seeded noise, leaving the model itself unchanged."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    # The state dict order matches the base, so a fine-tune gets the base's shard layout.
    for name, tensor in model.state_dict().items():
        weights = tensor.float()
        scale = RELATIVE_NOISE * weights.pow(2).mean().sqrt().item()
        noise = torch.randn(weights.shape, generator=generator, dtype=torch.float32)
        state[name] = weights.add_(noise, alpha=scale).to(torch.bfloat16)
        del weights, noise
    return state


def build_all(ckpt_dir: Path, *, layers: int, vocab_size: int) -> None:
    info = build_info(layers, vocab_size)
    info_path = ckpt_dir / "BUILD_INFO.json"
    if info_path.exists() and json.loads(info_path.read_text()) == info:
        LOG.info("checkpoints in %s are up to date", ckpt_dir)
        return

    # 1. Start from an empty folder so that no file of an older build survives.
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)

    # 2. The base model stays in memory while each fine-tune is derived and written.
    start = time.perf_counter()
    model = build_base(ckpt_dir / "base", layers, vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("wrote base (%.3fB parameters) in %.1f s", n_params / 1e9, time.perf_counter() - start)

    for name, seed in FINE_TUNE_SEEDS.items():
        start = time.perf_counter()
        state = perturbed_state_dict(model, seed)
        model.save_pretrained(ckpt_dir / name, state_dict=state, max_shard_size=SHARD_SIZE)
        make_tokenizer().save_pretrained(ckpt_dir / name)
        del state
        LOG.info("wrote %s in %.1f s", name, time.perf_counter() - start)

    # 3. The info file goes last, so an interrupted build is redone on the next run.
    info_path.write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path, help="folder that receives base/, ft1/, ft2/, ft3/")
    parser.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"],
                        help=f"number of decoder layers (default {MODEL_CONFIG['num_hidden_layers']}, the 0.5B model)")
    parser.add_argument("--vocab-size", type=int, default=MODEL_CONFIG["vocab_size"],
                        help=f"rows of the embedding and the head (default {MODEL_CONFIG['vocab_size']})")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    # The tokenizer saved beside each model uses ids up to 63.
    if args.vocab_size < 64:
        parser.error(f"--vocab-size must be at least 64, the tokenizer's vocabulary, got {args.vocab_size}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_all(args.ckpt_dir, layers=args.layers, vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
