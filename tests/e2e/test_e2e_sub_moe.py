"""End-to-end tests of `merge run` with sub_moe on tiny MoE checkpoints that transformers wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import invoke, message_of, write_recipe
from safetensors import safe_open
# The fixtures come from the MC-SMoE tests, so both methods merge the same tiny checkpoints.
from test_e2e_moe import (  # noqa: F401
    assert_loads_with_four_experts,
    calibration_file,
    identical_mixtral,
    logits_of,
    random_mixtral,
    save_with_tokenizer,
)

def run_sub_moe(tmp_path: Path, model: Path, calibration: Path, *, expected_exit: int = 0, **parameters):
    recipe = write_recipe(tmp_path, {
        "merge_method": "sub_moe", "models": [{"model": model}],
        "parameters": {"calibration": calibration, **parameters}, "output": {"path": tmp_path / "out"}})
    return invoke(["run", recipe], expected_exit=expected_exit), tmp_path / "out"


def test_identical_experts_keep_logits(tmp_path, identical_mixtral, calibration_file):
    _, out = run_sub_moe(tmp_path, identical_mixtral, calibration_file, num_experts=4)
    torch.testing.assert_close(logits_of(out), logits_of(identical_mixtral), atol=1e-4, rtol=0)


def test_identical_experts_low_rank_keep_logits(tmp_path, identical_mixtral, calibration_file):
    # Identical members share one row space, and rank 12 (the intermediate size) spans it, so the merge is exact.
    _, out = run_sub_moe(tmp_path, identical_mixtral, calibration_file, num_experts=2, rank=12)
    torch.testing.assert_close(logits_of(out), logits_of(identical_mixtral), atol=1e-4, rtol=0)


def test_output_loads_without_key_problems(tmp_path, random_mixtral, calibration_file):
    _, out = run_sub_moe(tmp_path, random_mixtral, calibration_file, num_experts=4, rank=4)
    assert_loads_with_four_experts(out)


def test_full_rank_matches_frequency_average(tmp_path, random_mixtral, calibration_file):
    _, out = run_sub_moe(tmp_path, random_mixtral, calibration_file, num_experts=3)
    report = json.loads((out / "expert_groups.json").read_text())
    assert report["method"] == "sub_moe"
    assert report["rank"] == 0
    for layer in report["layers"]:
        similarity = torch.tensor(layer["output_similarity"])
        assert similarity.shape == (8, 8)
        torch.testing.assert_close(similarity.diagonal(), torch.ones(8), atol=1e-4, rtol=0)
    with safe_open(out / "model.safetensors", "pt") as merged, \
            safe_open(random_mixtral / "model.safetensors", "pt") as original:
        for layer in report["layers"]:
            assert sorted(m for expert in layer["experts"] for m in expert["members"]) == list(range(8))
            for index, expert in enumerate(layer["experts"]):
                assert sum(expert["weights"]) == pytest.approx(1.0, abs=1e-5)
                for role in ("w1", "w2", "w3"):
                    expected = sum(weight * original.get_tensor(
                        f"model.layers.{layer['layer']}.block_sparse_moe.experts.{member}.{role}.weight")
                        for member, weight in zip(expert["members"], expert["weights"]))
                    stored = merged.get_tensor(
                        f"model.layers.{layer['layer']}.block_sparse_moe.experts.{index}.{role}.weight")
                    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=0)


def test_same_seed_same_clusters(tmp_path, random_mixtral, calibration_file):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = run_sub_moe(tmp_path / "a", random_mixtral, calibration_file, num_experts=3)
    _, second = run_sub_moe(tmp_path / "b", random_mixtral, calibration_file, num_experts=3)
    report = json.loads((first / "expert_groups.json").read_text())
    assert report == json.loads((second / "expert_groups.json").read_text())


def test_target_above_expert_count(tmp_path, random_mixtral, calibration_file):
    result, out = run_sub_moe(tmp_path, random_mixtral, calibration_file, num_experts=9, expected_exit=1)
    assert "num_experts" in message_of(result)
    assert not out.exists()


def test_aligned_identical_experts_keep_logits(tmp_path, identical_mixtral, calibration_file):
    _, out = run_sub_moe(tmp_path, identical_mixtral, calibration_file, num_experts=3, align=True,
                         router_row="dominant")
    torch.testing.assert_close(logits_of(out), logits_of(identical_mixtral), atol=1e-4, rtol=0)
    assert json.loads((out / "expert_groups.json").read_text())["align"] is True


def test_all_experts_kept_is_unchanged(tmp_path, random_mixtral, calibration_file):
    _, out = run_sub_moe(tmp_path, random_mixtral, calibration_file, num_experts=8, align=True, rank=2)
    torch.testing.assert_close(logits_of(out), logits_of(random_mixtral), atol=1e-5, rtol=0)


def test_qwen2_moe_output_loads(tmp_path, calibration_file):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    import checkpoints

    torch.manual_seed(1)
    config = Qwen2MoeConfig(vocab_size=checkpoints.build_tokenizer().vocab_size, hidden_size=16, intermediate_size=12,
                            moe_intermediate_size=8, shared_expert_intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64)
    source = save_with_tokenizer(Qwen2MoeForCausalLM(config).eval(), tmp_path / "qwen2-moe")
    (tmp_path / "run").mkdir()
    _, out = run_sub_moe(tmp_path / "run", source, calibration_file, num_experts=2, rank=4)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2
