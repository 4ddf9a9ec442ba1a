"""Builders of tiny checkpoints for the end-to-end tests of `merge`.

Every model is written by `transformers` `save_pretrained` from a tiny config (hidden size 32,
2 layers, a 32-token character vocabulary), so the tests merge files laid out exactly as real
checkpoints are. Each builder seeds torch, so two sessions build byte-identical tensors, and
returns the folder it wrote.

The broken and odd variants start as a copy of a good checkpoint and change one thing in it:
a tensor edited with `safetensors.torch.save_file`, a file removed or truncated, or a key
added to `config.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz .")
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 32
ADDED_TOKENS = ["<tool>", "</tool>"]
HIDDEN_SIZE = 32
BASE_SEED = 0

# The Llama tensor that the single-value variants edit: a norm weight, so one large value
# does not spread into other tensors of the merge.
EDITED_NORM = "model.layers.0.input_layernorm.weight"

# A tensor that no Llama has. The shape-mismatch variants add it with transposed shapes, so
# the only difference between the two checkpoints is (1, 8) against (8, 1).
PROBE_TENSOR = "model.layers.0.mlp.probe.weight"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 20480\n"
)


# Tokenizer and side files


def build_tokenizer(*, added_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer: one token per letter, space and period.

    A BPE model with no merges splits text into single characters, and the `Fuse` decoder
    joins them back without spaces.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if added_tokens:
        tokenizer.add_tokens(added_tokens)
    return tokenizer


def write_side_files(folder: Path, *, tag: str, added_tokens: list[str] | None = None) -> None:
    """Write the tokenizer, `special_tokens_map.json`, `generation_config.json` and `tokenizer.model`.

    `tag` makes the side files of each checkpoint differ (the chat template, the sampling
    temperature and the `tokenizer.model` bytes), so a test can tell which input the merge
    copied them from.
    """
    tokenizer = build_tokenizer(added_tokens=added_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE + "{# " + tag + " #}"
    tokenizer.save_pretrained(folder)

    # transformers 5 no longer writes this file, but many Hub checkpoints still ship it.
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")

    # The temperature is derived from the tag so that each checkpoint's file differs.
    temperature = 0.5 + (int(hashlib.sha256(tag.encode()).hexdigest(), 16) % 50) / 100
    generation = GenerationConfig(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        do_sample=True,
        temperature=temperature,
        max_new_tokens=16,
    )
    generation.save_pretrained(folder)

    # Stands in for a SentencePiece model: bytes that are not valid UTF-8, so a copy made
    # in text mode would change them.
    (folder / "tokenizer.model").write_bytes(b"\x00\xffsentencepiece stand-in\x80" + tag.encode() + bytes(range(256)))


# Models


# Sizes and token ids shared by the tiny Llama and Qwen2 configs.
TINY_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def llama_config(**overrides) -> LlamaConfig:
    """Return the tiny Llama config, with `overrides` applied."""
    return LlamaConfig(**{**TINY_DECODER, "tie_word_embeddings": False, **overrides})


def qwen2_tied_config() -> Qwen2Config:
    """Return the tiny Qwen2 config whose output head shares the input embedding."""
    return Qwen2Config(**TINY_DECODER, tie_word_embeddings=True)


def add_seeded_deltas(model: PreTrainedModel, *, seed: int, scale: float) -> PreTrainedModel:
    """Add `scale` times seeded Gaussian noise to every floating-point parameter, as a fine-tune would.

    Tied parameters are one tensor in `named_parameters`, so they move together.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((scale * noise).to(parameter.dtype))
    return model


def save_checkpoint(
    model: PreTrainedModel,
    folder: Path,
    *,
    tag: str,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    added_tokens: list[str] | None = None,
) -> Path:
    """Save `model` in `dtype` with `save_pretrained` and write the side files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_side_files(folder, tag=tag, added_tokens=added_tokens)
    return folder


def make_llama_base() -> LlamaForCausalLM:
    """Return the tiny Llama base model, the same weights on every call."""
    torch.manual_seed(BASE_SEED)
    return LlamaForCausalLM(llama_config()).eval()


def build_llama_base(
    folder: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, tag: str = "base"
) -> Path:
    """Save the tiny Llama base, in one file or in shards of at most `max_shard_size`."""
    return save_checkpoint(make_llama_base(), folder, tag=tag, dtype=dtype, max_shard_size=max_shard_size)


def build_llama_fine_tune(
    folder: Path, *, seed: int, dtype: torch.dtype = torch.float32, scale: float = 0.02, tag: str | None = None
) -> Path:
    """Save a fine-tune of the tiny Llama base: the base plus seeded noise of size `scale`."""
    model = add_seeded_deltas(make_llama_base(), seed=seed, scale=scale)
    return save_checkpoint(model, folder, tag=tag or f"fine-tune-{seed}", dtype=dtype)


def build_llama_resized_vocab(folder: Path, *, seed: int, added_tokens: list[str] = ADDED_TOKENS) -> Path:
    """Save a fine-tune whose tokenizer has extra tokens and whose embeddings were resized to match."""
    model = add_seeded_deltas(make_llama_base(), seed=seed, scale=0.02)
    model.resize_token_embeddings(VOCAB_SIZE + len(added_tokens))
    return save_checkpoint(model, folder, tag=f"resized-{seed}", added_tokens=added_tokens)


def make_qwen2_tied_base() -> Qwen2ForCausalLM:
    """Return the tiny tied-embedding Qwen2 base model, the same weights on every call."""
    torch.manual_seed(BASE_SEED)
    return Qwen2ForCausalLM(qwen2_tied_config()).eval()


def build_qwen2_tied(folder: Path, *, fine_tune_seed: int | None = None) -> Path:
    """Save the tied Qwen2 base, or a fine-tune of it when `fine_tune_seed` is given.

    `save_pretrained` leaves `lm_head.weight` out of the file because it is the embedding.
    """
    model = make_qwen2_tied_base()
    if fine_tune_seed is None:
        return save_checkpoint(model, folder, tag="qwen2-base")
    add_seeded_deltas(model, seed=fine_tune_seed, scale=0.02)
    return save_checkpoint(model, folder, tag=f"qwen2-fine-tune-{fine_tune_seed}")


# Editing saved checkpoints


def copy_checkpoint(source: Path, folder: Path) -> Path:
    """Copy a checkpoint folder, so that the copy can be edited in place."""
    shutil.copytree(source, folder)
    return folder


def weight_files(folder: Path) -> list[Path]:
    """Return the checkpoint's `.safetensors` files, sorted by name."""
    return sorted(folder.glob("*.safetensors"))


def file_of_tensor(folder: Path, name: str) -> Path:
    """Return the `.safetensors` file of `folder` that stores tensor `name`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def edit_tensors(path: Path, edit) -> None:
    """Rewrite one `.safetensors` file with the tensors that `edit(tensors)` returns.

    The file keeps the `{"format": "pt"}` metadata that `save_pretrained` writes.
    """
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    save_file(edit(dict(tensors)), path, metadata=metadata)


def set_tensor_value(folder: Path, name: str, index: tuple[int, ...], value: float) -> Path:
    """Set one element of tensor `name`, keeping its dtype."""

    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        changed = tensors[name].clone()
        changed[index] = value
        tensors[name] = changed
        return tensors

    edit_tensors(file_of_tensor(folder, name), edit)
    return folder


def add_tensor(folder: Path, name: str, tensor: torch.Tensor) -> Path:
    """Add tensor `name` to the checkpoint's only `.safetensors` file."""

    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[name] = tensor
        return tensors

    edit_tensors(folder / "model.safetensors", edit)
    return folder


def remove_shard(folder: Path, *, shard_number: int = 2) -> Path:
    """Delete one shard that the index still names, and return its path."""
    shard = sharded_files(folder)[shard_number - 1]
    shard.unlink()
    return shard


def replace_shard_with_lfs_pointer(folder: Path, *, shard_number: int = 2) -> Path:
    """Replace one shard with the text of a git-LFS pointer, as a clone without `git lfs` leaves it."""
    shard = sharded_files(folder)[shard_number - 1]
    shard.write_text(LFS_POINTER)
    return shard


def truncate_shard(folder: Path, *, shard_number: int = 2, missing_bytes: int = 5) -> Path:
    """Cut the last `missing_bytes` bytes off one shard, as an interrupted download leaves it."""
    shard = sharded_files(folder)[shard_number - 1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-missing_bytes])
    return shard


def sharded_files(folder: Path) -> list[Path]:
    """Return the shard files named by the index, in order."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return [folder / name for name in sorted(set(weight_map.values()))]


def add_quantization_config(folder: Path) -> Path:
    """Mark the checkpoint as 8-bit bitsandbytes-quantized in `config.json`."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "load_in_4bit": False,
        "llm_int8_threshold": 6.0,
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def quantize_projections_to_int8(folder: Path, *, with_scales: bool) -> Path:
    """Store every `*_proj.weight` as int8, as int8 checkpoints do, with per-row `*_proj.weight_scale` if `with_scales`.

    `config.json` is left unchanged, so only the tensors show the quantization.
    """

    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in sorted(tensors):
            if not name.endswith("_proj.weight"):
                continue
            weight = tensors[name].float()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            tensors[name] = torch.round(weight / scale).to(torch.int8)
            if with_scales:
                tensors[name.removesuffix("weight") + "weight_scale"] = scale.squeeze(1)
        return tensors

    edit_tensors(folder / "model.safetensors", edit)
    return folder


def convert_to_pytorch_bin(folder: Path) -> Path:
    """Replace `model.safetensors` with the same tensors in `pytorch_model.bin`, as older checkpoints store them."""
    tensors = load_file(folder / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


# Hugging Face cache


def commit_hash(repo_id: str) -> str:
    """Return a fixed 40-hex commit id for `repo_id`, like a git commit id."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def install_in_hub_cache(source: Path, cache_dir: Path, repo_id: str) -> str:
    """Lay out `source` as `huggingface_hub` caches a download of `repo_id`, and return the commit id.

    The layout is `models--org--name/{blobs,refs/main,snapshots/<commit>}`, where each
    snapshot file is a relative symlink to a blob named by the file's SHA-256, as
    `huggingface_hub` writes it. With `HF_HUB_OFFLINE=1` the repo id then resolves to the
    snapshot folder without any network access.
    """
    commit = commit_hash(repo_id)
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_folder / "blobs"
    snapshot = repo_folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)

    for path in sorted(source.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blobs / digest)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)

    refs = repo_folder / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(commit)
    return commit


TINY_BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)


def build_bert_family(root: Path) -> dict[str, Path]:
    """Save a bare BertModel base and two classification fine-tunes of it, with 2 and 3 labels.

    The fine-tunes store the encoder under `bert.` beside a `classifier.*` head, as task models do.
    """
    torch.manual_seed(0)
    base = BertModel(BertConfig(**TINY_BERT)).eval()
    base.save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for seed, labels in ((1, 2), (2, 3)):
        fine_tune = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=labels))
        fine_tune.bert.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in fine_tune.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        fine_tune.save_pretrained(root / f"ft-{seed}")
        folders[f"ft-{seed}"] = root / f"ft-{seed}"
    return folders
