"""Unit tests of the MC-SMoE math and of the expert layout detection, on hand-sized tensors."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.moe.grouping import (
    ExpertGroup,
    align_to,
    dominant_experts,
    group_by_similarity,
    groups_of_dominants_only,
    merge_group,
    permute_expert,
    random_groups,
    router_logit_similarity,
    router_rows,
)
from mergekit_plus.moe.layout import find_expert_layers

ROLES = {"input_roles": ("w1", "w3"), "output_role": "w2"}


def random_expert(seed: int, *, hidden: int = 6, intermediate: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(intermediate, hidden, generator=generator),
            "w3": torch.randn(intermediate, hidden, generator=generator),
            "w2": torch.randn(hidden, intermediate, generator=generator)}


def expert_forward(expert: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ expert["w1"].T) * (x @ expert["w3"].T)) @ expert["w2"].T


def test_grouping_hand_computed():
    usage = torch.tensor([0.5, 0.3, 0.2, 0.0])
    # Expert 2 is closer to expert 1, expert 3 closer to expert 0.
    similarity = torch.tensor([[1.0, 0.1, 0.2, 0.9],
                               [0.1, 1.0, 0.8, 0.3],
                               [0.2, 0.8, 1.0, 0.0],
                               [0.9, 0.3, 0.0, 1.0]])
    groups = group_by_similarity(usage, similarity, 2)
    assert [group.members for group in groups] == [(0, 3), (1, 2)]
    assert groups[0].weights == pytest.approx((1.0, 0.0))
    assert groups[1].weights == pytest.approx((0.6, 0.4))


def test_group_weights_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    usage = torch.rand(8, generator=generator)
    usage /= usage.sum()
    gram = torch.randn(50, 8, generator=generator)
    similarity = router_logit_similarity(gram.T @ gram)
    for count in (1, 2, 4, 8):
        groups = group_by_similarity(usage, similarity, count)
        assert sorted(member for group in groups for member in group.members) == list(range(8))
        for group in groups:
            assert sum(group.weights) == pytest.approx(1.0)


def test_unused_group_gets_uniform_weights():
    usage = torch.tensor([1.0, 0.0, 0.0, 0.0])
    similarity = torch.eye(4)
    groups = group_by_similarity(usage, similarity, 2)
    unused = next(group for group in groups if group.dominant != 0)
    assert sum(unused.weights) == pytest.approx(1.0)
    assert len(set(unused.weights)) == 1


def test_dominant_ties_go_to_lower_index():
    assert dominant_experts(torch.tensor([0.25, 0.25, 0.25, 0.25]), 2) == [0, 1]
    assert dominant_experts(torch.tensor([0.1, 0.4, 0.1, 0.4]), 2) == [1, 3]


def test_similarity_is_cosine_of_logit_columns():
    logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 6.0, 0.0]], dtype=torch.float64)
    similarity = router_logit_similarity(logits.T @ logits)
    assert similarity[0, 1] == pytest.approx(1.0)
    assert similarity[0, 2] == 0.0
    assert similarity[2, 2] == 0.0


def test_group_of_one_is_unchanged():
    experts = [random_expert(seed) for seed in range(3)]
    merged = merge_group(experts, ExpertGroup((1,), (1.0,)), align=True, **ROLES)
    for role, tensor in experts[1].items():
        assert torch.equal(merged[role], tensor)


def test_alignment_recovers_known_permutation():
    reference = random_expert(0, hidden=8, intermediate=7)
    permutation = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    shuffled = permute_expert(reference, permutation, **ROLES)
    found = align_to(reference, shuffled, **ROLES)
    restored = permute_expert(shuffled, found, **ROLES)
    for role in reference:
        assert torch.equal(restored[role], reference[role])


def test_permutation_keeps_expert_function():
    expert = random_expert(1)
    permuted = permute_expert(expert, torch.tensor([4, 2, 0, 3, 1]), **ROLES)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(expert_forward(permuted, x), expert_forward(expert, x))


def test_aligned_merge_of_permuted_copy_is_identity():
    reference = random_expert(3)
    copy = permute_expert(reference, torch.tensor([1, 0, 4, 2, 3]), **ROLES)
    group = ExpertGroup((0, 1), (0.7, 0.3))
    aligned = merge_group([reference, copy], group, align=True, **ROLES)
    plain = merge_group([reference, copy], group, align=False, **ROLES)
    for role in reference:
        torch.testing.assert_close(aligned[role], reference[role])
    assert not torch.allclose(plain["w1"], reference["w1"])


def test_merge_is_weighted_average_without_alignment():
    experts = [random_expert(seed) for seed in range(2)]
    merged = merge_group(experts, ExpertGroup((0, 1), (0.25, 0.75)), align=False, **ROLES)
    for role in experts[0]:
        torch.testing.assert_close(merged[role], 0.25 * experts[0][role] + 0.75 * experts[1][role])


def test_dominant_router_row_keeps_top_k_weights():
    generator = torch.Generator().manual_seed(4)
    router = torch.randn(8, 6, generator=generator)
    groups = [ExpertGroup((0, 5), (0.5, 0.5)), ExpertGroup((2, 1), (0.9, 0.1)),
              ExpertGroup((3, 7), (0.6, 0.4)), ExpertGroup((4, 6), (0.8, 0.2))]
    merged = router_rows(router, groups, rule="dominant")
    dominants = torch.tensor([group.dominant for group in groups])
    tokens = torch.randn(400, 6, generator=generator)

    def routed(weights: torch.Tensor, x: torch.Tensor):
        top = torch.softmax(x @ weights.T, dim=-1).topk(2, dim=-1)
        return top.indices, top.values / top.values.sum(-1, keepdim=True)

    before_index, before_weight = routed(router, tokens)
    after_index, after_weight = routed(merged, tokens)
    on_dominants = torch.isin(before_index, dominants).all(dim=-1)
    assert on_dominants.sum() >= 10
    torch.testing.assert_close(dominants[after_index[on_dominants]], before_index[on_dominants])
    torch.testing.assert_close(after_weight[on_dominants], before_weight[on_dominants])
    torch.testing.assert_close(after_weight.sum(-1), torch.ones(400))


def test_weighted_mean_router_row():
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    rows = router_rows(router, [ExpertGroup((2, 0), (0.5, 0.5)), ExpertGroup((1,), (1.0,))], rule="weighted_mean")
    torch.testing.assert_close(rows, torch.tensor([[1.5, 1.0], [0.0, 1.0]]))


def test_drop_and_random_baselines():
    usage = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert [group.members for group in groups_of_dominants_only(usage, 2)] == [(1,), (2,)]
    groups = random_groups(8, 4, seed=0)
    assert sorted(member for group in groups for member in group.members) == list(range(8))
    assert all(group.weights == (0.5, 0.5) for group in groups)
    assert random_groups(8, 4, seed=0) == groups


def test_layout_of_mixtral_names():
    shapes = {f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}.weight": (4, 3)
              for layer in range(2) for expert in range(3) for role in ("w1", "w2", "w3")}
    shapes["model.layers.0.block_sparse_moe.gate.weight"] = (3, 3)
    layers = find_expert_layers(shapes)
    assert [(layer.layer, layer.num_experts, layer.fused) for layer in layers] == [(0, 3, False), (1, 3, False)]
    assert layers[0].router_tensors(shapes) == ["model.layers.0.block_sparse_moe.gate.weight"]


def test_layout_skips_qwen2_moe_shared_expert():
    shapes = {f"model.layers.0.mlp.experts.{expert}.{role}.weight": (4, 3)
              for expert in range(4) for role in ("gate_proj", "up_proj", "down_proj")}
    shapes.update({"model.layers.0.mlp.shared_expert.gate_proj.weight": (4, 3),
                   "model.layers.0.mlp.shared_expert_gate.weight": (1, 3),
                   "model.layers.0.mlp.gate.weight": (4, 3)})
    (layer,) = find_expert_layers(shapes)
    assert layer.input_roles == ("gate_proj", "up_proj")
    assert layer.output_role == "down_proj"
    assert not any("shared" in name for name in layer.expert_tensors())
    assert layer.router_tensors(shapes) == ["model.layers.0.mlp.gate.weight"]


def test_layout_of_fused_experts():
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (8, 10, 3), "model.layers.0.mlp.experts.down_proj": (8, 3, 5)}
    (layer,) = find_expert_layers(shapes)
    assert layer.fused
    assert layer.num_experts == 8


def test_layout_rejects_missing_expert():
    shapes = {f"model.layers.0.block_sparse_moe.experts.{expert}.{role}.weight": (4, 3)
              for expert in (0, 2) for role in ("w1", "w2", "w3")}
    with pytest.raises(ValueError, match=r"experts \[1\] are missing"):
        find_expert_layers(shapes)
