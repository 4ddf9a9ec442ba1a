"""Fine-tunes with a task head (`bert.` prefix plus `classifier.*`) merged onto a bare `BertModel` base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import TINY_BERT, build_bert_family
from merge_helpers import invoke, message_of, read_tensors, write_recipe
from transformers import BertConfig, BertForSequenceClassification, BertModel



@pytest.fixture(scope="module")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    return build_bert_family(tmp_path_factory.mktemp("bert-family"))


def test_task_heads_left_out(bert_family, tmp_path):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": bert_family["base"],
        "models": [{"model": bert_family["ft-1"]}, {"model": bert_family["ft-2"]}],
        "parameters": {"lambda": 0.5}, "output": {"path": output},
    })
    invoke(["run", recipe], expected_exit=0)

    base = read_tensors(bert_family["base"])
    merged = read_tensors(output)
    fine_tunes = [read_tensors(bert_family["ft-1"]), read_tensors(bert_family["ft-2"])]
    assert set(merged) == set(base)
    for name, tensor in base.items():
        expected = tensor + 0.5 * sum(ft[f"bert.{name}"] - tensor for ft in fine_tunes)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    loaded = BertModel.from_pretrained(output, output_loading_info=True)
    assert not loaded[1]["missing_keys"]
    assert not loaded[1]["unexpected_keys"]


def test_plan_lists_task_heads(bert_family, tmp_path):
    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": bert_family["base"],
        "models": [{"model": bert_family["ft-1"]}, {"model": bert_family["ft-2"]}],
        "output": {"path": tmp_path / "merged"},
    })
    text = message_of(invoke(["plan", recipe], expected_exit=0))
    assert "dropped classifier.weight: task head of model" in text
    assert "kept out of the merge" in text


def test_unrelated_prefix_still_rejected(bert_family, tmp_path):
    """A model whose extra tensors are not a task head around the base's names stays an error."""
    torch.manual_seed(3)
    other = BertForSequenceClassification(BertConfig(**{**TINY_BERT, "num_hidden_layers": 1}))
    other.save_pretrained(tmp_path / "other")
    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": bert_family["base"],
        "models": [{"model": tmp_path / "other"}], "output": {"path": tmp_path / "merged"},
    })
    text = message_of(invoke(["run", recipe], expected_exit=2))
    assert "present in model" in text
