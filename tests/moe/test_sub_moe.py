"""Unit tests of the Sub-MoE math: output similarity, seeded k-means and the subspace merge."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.moe.subspace import cluster_experts, kmeans, output_cosine_sum, subspace_merge

OMEGA = (0.5, 0.3, 0.2)


def random_matrices(seed: int = 0, shape: tuple[int, int] = (6, 4)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in OMEGA]


def weighted_sum(matrices: list[torch.Tensor]) -> torch.Tensor:
    return sum(weight * matrix for weight, matrix in zip(OMEGA, matrices))


def test_full_rank_equals_frequency_average():
    matrices = random_matrices()
    merged = subspace_merge(matrices, OMEGA, rank=0, compute_dtype=torch.float64)
    torch.testing.assert_close(merged, weighted_sum(matrices), atol=1e-12, rtol=0)


def test_rank_at_or_above_full_equals_average():
    matrices = random_matrices()
    for rank in (6, 12, 100):
        merged = subspace_merge(matrices, OMEGA, rank=rank, compute_dtype=torch.float64)
        torch.testing.assert_close(merged, weighted_sum(matrices), atol=1e-12, rtol=0)


def test_rank_three_projects_average():
    matrices = random_matrices()
    u, _, _ = torch.linalg.svd(torch.cat(matrices, dim=1), full_matrices=False)
    projection = u[:, :3] @ u[:, :3].T
    merged = subspace_merge(matrices, OMEGA, rank=3, compute_dtype=torch.float64)
    torch.testing.assert_close(merged, projection @ weighted_sum(matrices), atol=1e-12, rtol=0)


def test_wide_matrices_rank_identity():
    # Output-projection shape (d_model × d_ff): fewer rows than columns.
    matrices = random_matrices(seed=3, shape=(4, 7))
    u, _, _ = torch.linalg.svd(torch.cat(matrices, dim=1), full_matrices=False)
    merged = subspace_merge(matrices, OMEGA, rank=2, compute_dtype=torch.float64)
    torch.testing.assert_close(merged, u[:, :2] @ u[:, :2].T @ weighted_sum(matrices), atol=1e-12, rtol=0)


def test_single_matrix_unchanged():
    matrix = random_matrices()[0]
    assert torch.equal(subspace_merge([matrix], (1.0,), rank=1, compute_dtype=torch.float64), matrix)


def test_merge_returns_compute_dtype():
    matrices = [matrix.float() for matrix in random_matrices()]
    assert subspace_merge(matrices, OMEGA, rank=2).dtype == torch.float32


def test_negative_rank_rejected():
    with pytest.raises(ValueError, match="rank must be 0"):
        subspace_merge(random_matrices(), OMEGA, rank=-1)


def test_output_cosine_hand_computed():
    outputs = torch.tensor([[[1.0, 0.0], [0.0, 2.0]],
                            [[2.0, 0.0], [1.0, 0.0]],
                            [[0.0, 0.0], [0.0, -1.0]]])
    sums = output_cosine_sum(outputs)
    expected = torch.tensor([[2.0, 1.0, -1.0],
                             [1.0, 2.0, 0.0],
                             [-1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sums, expected)


def test_kmeans_separates_obvious_clusters():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.0, 0.1], [5.0, 5.1]])
    assert kmeans(points, 2, seed=0) == [0, 0, 1, 1, 0, 1]


def test_kmeans_is_deterministic_for_seed():
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(16, 5, generator=generator)
    first = kmeans(points, 4, seed=7, restarts=3)
    assert kmeans(points, 4, seed=7, restarts=3) == first
    assert sorted(set(first)) == [0, 1, 2, 3]


def test_kmeans_identical_points_fill_every_cluster():
    labels = kmeans(torch.zeros(8, 3), 4, seed=0)
    assert sorted(set(labels)) == [0, 1, 2, 3]


def test_kmeans_rejects_too_many_clusters():
    with pytest.raises(ValueError, match="cannot split 3 points into 4"):
        kmeans(torch.zeros(3, 2), 4, seed=0)


def test_cluster_weights_and_order():
    usage = torch.tensor([0.1, 0.4, 0.3, 0.2])
    # Experts 0 and 1 produce the same outputs, and so do experts 2 and 3.
    similarity = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                               [1.0, 1.0, 0.0, 0.0],
                               [0.0, 0.0, 1.0, 1.0],
                               [0.0, 0.0, 1.0, 1.0]])
    groups = cluster_experts(usage, similarity, 2, seed=0)
    assert [group.members for group in groups] == [(1, 0), (2, 3)]
    assert groups[0].weights == pytest.approx((0.8, 0.2))
    assert groups[1].weights == pytest.approx((0.6, 0.4))


def test_unused_cluster_gets_uniform_weights():
    usage = torch.tensor([1.0, 0.0, 0.0, 0.0])
    similarity = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                               [0.0, 1.0, 1.0, 1.0],
                               [0.0, 1.0, 1.0, 1.0],
                               [0.0, 1.0, 1.0, 1.0]])
    groups = cluster_experts(usage, similarity, 2, seed=0)
    assert [group.members for group in groups] == [(0,), (1, 2, 3)]
    assert groups[1].weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_all_clusters_kept_is_identity_order():
    generator = torch.Generator().manual_seed(1)
    usage = torch.rand(6, generator=generator)
    outputs = torch.randn(6, 20, 4, generator=generator)
    similarity = output_cosine_sum(outputs) / 20
    groups = cluster_experts(usage, similarity, 6, seed=0)
    assert [group.members for group in groups] == [(expert,) for expert in range(6)]
