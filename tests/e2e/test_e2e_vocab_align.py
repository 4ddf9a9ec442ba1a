"""Inputs with different vocabularies: `tokenizer.vocab: align` matches embedding rows by token."""

from __future__ import annotations

import json

import torch
from merge_helpers import invoke, load_and_generate, message_of, read_tensors, write_recipe

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def aligned_recipe(base, fine_tunes, output, *, source) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": fine_tune} for fine_tune in fine_tunes],
        "parameters": {"lambda": 0.5},
        "tokenizer": {"source": source, "vocab": "align"},
        "output": {"path": output},
    }


def test_added_tokens_keep_their_rows(tmp_path, llama_base, llama_fine_tunes, llama_resized_vocab):
    output = tmp_path / "merged"
    fine_tune = llama_fine_tunes[0]
    recipe = write_recipe(tmp_path, aligned_recipe(llama_base, [fine_tune, llama_resized_vocab], output,
                                                   source=str(llama_resized_vocab)))
    invoke(["run", recipe], expected_exit=0)

    merged = read_tensors(output)
    base, tuned, resized = (read_tensors(folder) for folder in (llama_base, fine_tune, llama_resized_vocab))
    for name in (EMBEDDING, HEAD):
        assert merged[name].shape == (34, base[name].shape[1])
        # The 32 shared rows: base + 0.5 * (both task vectors), as for any other tensor.
        expected_shared = base[name] + 0.5 * ((tuned[name] - base[name]) + (resized[name][:32] - base[name]))
        torch.testing.assert_close(merged[name][:32], expected_shared)
        # The two added rows exist only in the resized model, so they are its rows unchanged.
        torch.testing.assert_close(merged[name][32:], resized[name][32:])

    assert json.loads((output / "config.json").read_text())["vocab_size"] == 34
    load_and_generate(output)


def test_source_missing_tokens_rejected(tmp_path, llama_base, llama_fine_tunes, llama_resized_vocab):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, aligned_recipe(llama_base, [llama_fine_tunes[0], llama_resized_vocab], output,
                                                   source="base"))
    result = invoke(["run", recipe], expected_exit=2)
    message = message_of(result)
    assert "lacks 2 tokens" in message
    assert "'<tool>'" in message
    assert not output.exists()


def test_align_with_equal_vocabularies_matches_strict(tmp_path, llama_base, llama_fine_tunes):
    strict_output = tmp_path / "strict"
    aligned_output = tmp_path / "aligned"
    strict = aligned_recipe(llama_base, llama_fine_tunes, strict_output, source="base")
    strict["tokenizer"] = {"source": "base"}
    invoke(["run", write_recipe(tmp_path, strict, name="strict.yaml")], expected_exit=0)
    aligned = aligned_recipe(llama_base, llama_fine_tunes, aligned_output, source="base")
    invoke(["run", write_recipe(tmp_path, aligned, name="aligned.yaml")], expected_exit=0)

    assert (strict_output / "model.safetensors").read_bytes() == (aligned_output / "model.safetensors").read_bytes()
