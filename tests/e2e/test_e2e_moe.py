"""End-to-end tests of `merge run` with mc_smoe on tiny MoE checkpoints that transformers wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import invoke, message_of, write_recipe
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import checkpoints

CALIBRATION = ["the cat sat.", "a dog ran far.", "birds fly high.", "fish swim deep.", "so it goes."]


def save_with_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    checkpoints.build_tokenizer().save_pretrained(folder)
    return folder


def tiny_mixtral(*, identical: bool) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=checkpoints.build_tokenizer().vocab_size, hidden_size=16, intermediate_size=12,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for parameter in (experts.gate_up_proj, experts.down_proj):
                parameter.normal_(std=0.2)
                if identical:
                    parameter.copy_(parameter[:1].expand_as(parameter))
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in CALIBRATION))
    return path


@pytest.fixture(scope="module")
def identical_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_tokenizer(tiny_mixtral(identical=True), tmp_path_factory.mktemp("mixtral") / "identical")


@pytest.fixture(scope="module")
def random_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_tokenizer(tiny_mixtral(identical=False), tmp_path_factory.mktemp("mixtral") / "random")


def run_mc_smoe(tmp_path: Path, model: Path, calibration: Path, *, expected_exit: int = 0, **parameters):
    recipe = write_recipe(tmp_path, {
        "merge_method": "mc_smoe", "models": [{"model": model}],
        "parameters": {"calibration": calibration, **parameters}, "output": {"path": tmp_path / "out"}})
    return invoke(["run", recipe], expected_exit=expected_exit), tmp_path / "out"


def logits_of(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 2, 14, 6]])
    with torch.no_grad():
        return model(ids).logits


def load_info(folder: Path) -> dict:
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return info


def test_identical_experts_keep_logits(tmp_path, identical_mixtral, calibration_file):
    _, out = run_mc_smoe(tmp_path, identical_mixtral, calibration_file, num_experts=4)
    torch.testing.assert_close(logits_of(out), logits_of(identical_mixtral), atol=1e-4, rtol=0)


def assert_loads_with_four_experts(out: Path) -> None:
    """Check a 4-expert merge of the tiny Mixtral: clean load, resized config and router, finite logits."""
    info = load_info(out)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2
    with safe_open(out / "model.safetensors", "pt") as stored:
        assert stored.get_slice("model.layers.0.block_sparse_moe.gate.weight").get_shape() == [4, 16]
        assert "model.layers.0.block_sparse_moe.experts.4.w1.weight" not in stored.keys()
    assert torch.isfinite(logits_of(out)).all()


def test_output_loads_with_four_experts(tmp_path, random_mixtral, calibration_file):
    _, out = run_mc_smoe(tmp_path, random_mixtral, calibration_file, num_experts=4)
    assert_loads_with_four_experts(out)


def test_groups_report_weights(tmp_path, random_mixtral, calibration_file):
    _, out = run_mc_smoe(tmp_path, random_mixtral, calibration_file, num_experts=3)
    report = json.loads((out / "expert_groups.json").read_text())
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert sum(layer["usage"]) == pytest.approx(1.0, abs=1e-5)
        assert len(layer["experts"]) == 3
        assert sorted(m for expert in layer["experts"] for m in expert["members"]) == list(range(8))
        for expert in layer["experts"]:
            assert sum(expert["weights"]) == pytest.approx(1.0, abs=1e-5)


def test_one_expert_lowers_top_k(tmp_path, random_mixtral, calibration_file):
    _, out = run_mc_smoe(tmp_path, random_mixtral, calibration_file, num_experts=1, strategy="drop_least_used")
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 1
    assert config["num_experts_per_tok"] == 1
    assert not load_info(out)["mismatched_keys"]


def test_all_experts_kept_is_unchanged(tmp_path, random_mixtral, calibration_file):
    _, out = run_mc_smoe(tmp_path, random_mixtral, calibration_file, num_experts=8)
    torch.testing.assert_close(logits_of(out), logits_of(random_mixtral), atol=1e-5, rtol=0)


def test_target_above_expert_count(tmp_path, random_mixtral, calibration_file):
    result, out = run_mc_smoe(tmp_path, random_mixtral, calibration_file, num_experts=9, expected_exit=1)
    assert "`num_experts: 9` is above the 8 experts" in message_of(result)
    assert not out.exists()


def test_missing_calibration_file(tmp_path, random_mixtral):
    result, out = run_mc_smoe(tmp_path, random_mixtral, tmp_path / "absent.jsonl", num_experts=4, expected_exit=1)
    assert "calibration file" in message_of(result)
    assert not out.exists()


def test_validate_finds_moe_problems(tmp_path, random_mixtral, llama_base, calibration_file):
    """`merge validate` reports what `merge run` would fail on, before any model is loaded."""
    missing = write_recipe(tmp_path, {
        "merge_method": "mc_smoe", "models": [{"model": random_mixtral}],
        "parameters": {"num_experts": 4, "calibration": tmp_path / "absent.jsonl"}, "output": {"path": tmp_path / "a"}},
        name="missing.yaml")
    assert "calibration file" in message_of(invoke(["validate", missing], expected_exit=1))
    dense = write_recipe(tmp_path, {
        "merge_method": "mc_smoe", "models": [{"model": llama_base}],
        "parameters": {"num_experts": 4, "calibration": calibration_file}, "output": {"path": tmp_path / "b"}},
        name="dense.yaml")
    assert "has no MoE experts" in message_of(invoke(["validate", dense], expected_exit=1))


def test_qwen2_moe_keeps_shared_expert(tmp_path, calibration_file):
    torch.manual_seed(1)
    config = Qwen2MoeConfig(vocab_size=checkpoints.build_tokenizer().vocab_size, hidden_size=16, intermediate_size=12,
                            moe_intermediate_size=8, shared_expert_intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64)
    source = save_with_tokenizer(Qwen2MoeForCausalLM(config).eval(), tmp_path / "qwen2-moe")
    (tmp_path / "run").mkdir()
    _, out = run_mc_smoe(tmp_path / "run", source, calibration_file, num_experts=2)
    info = load_info(out)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2
    with safe_open(out / "model.safetensors", "pt") as merged, safe_open(source / "model.safetensors", "pt") as original:
        for name in ("model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
            assert torch.equal(merged.get_tensor(name), original.get_tensor(name))


def test_plan_describes_expert_merge(tmp_path, random_mixtral, calibration_file):
    recipe = write_recipe(tmp_path, {
        "merge_method": "mc_smoe", "models": [{"model": random_mixtral}],
        "parameters": {"calibration": calibration_file, "num_experts": 4}, "output": {"path": tmp_path / "out"}})
    planned = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).output)
    text = invoke(["plan", recipe], expected_exit=0).output
    summary = json.loads(invoke(["run", recipe, "--json", "-q"], expected_exit=0).output)

    # Mixtral stores each expert as w1, w2 and w3: 8 experts become 4 in each of the 2 layers, plus 1 router.
    assert planned["moe"]["experts_after"] == 4
    assert planned["tensors"]["merge"] == 2 * (4 * 3 + 1)
    assert planned["tensors"]["merge"] + planned["tensors"]["copy"] == summary["tensors"]
    assert planned["total_bytes"] == summary["total_bytes"]
    assert "8 experts each → 4" in text
    assert "copied unchanged" in text
