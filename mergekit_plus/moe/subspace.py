"""The math of Sub-MoE expert merging, as pure functions over small tensors.

Li et al., Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging,
arXiv:2506.23266. Per MoE layer with E experts merged into K:

1. every expert runs on every calibration token x_l (l = 1..m) that reaches the layer, routed or not,
   and Sim(i, j) = (1/m) Σ_l cos(E_i(x_l), E_j(x_l));
2. k-means with k-means++ initialisation splits the experts into K clusters, with the rows of
   1 − Sim as features (the feature choice of the zhy617/SMoE re-implementation);
3. usage f_e counts every top-k pick, as in MC-SMoE, and a cluster's merge weights are
   ω_i = f_i / Σ_{j∈G} f_j (uniform when no member was ever picked);
4. per weight matrix type, the cluster's matrices W_i (out × in) are concatenated along the input
   dimension, W_cat = [W_1 | … | W_n] = U Σ [V_1ᵀ | … | V_nᵀ], so U is shared and V_i belongs to expert i;
5. the merged matrix is W̄ = U_r Σ_r (Σ_i ω_i V_iᵀ)_r, which equals U_r U_rᵀ Σ_i ω_i W_i. At full rank it is
   the frequency-weighted average Σ_i ω_i W_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_plus.moe.grouping import ExpertGroup


def output_cosine_sum(outputs: torch.Tensor) -> torch.Tensor:
    """Return Σ_l cos(E_i(x_l), E_j(x_l)) (E × E) from expert outputs of shape E × tokens × d_model.

    An output that is zero on a token counts as cosine 0 with every other output on that token.
    """
    outputs = outputs.double()
    norms = outputs.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, outputs / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return torch.einsum("itd,jtd->ij", unit, unit)


def kmeans(features: torch.Tensor, count: int, *, seed: int, restarts: int = 10,
           iterations: int = 100) -> list[int]:
    """Return the cluster of each row of `features` (n × d) after k-means into `count` non-empty clusters.

    Each restart starts from k-means++ seeds drawn with a generator seeded by `seed` and its index.
    The restart with the smallest within-cluster sum of squares wins, and the earlier one on a tie.
    Clusters are numbered by their lowest member, so equal partitions get equal labels.
    """
    points = features.double()
    if not 1 <= count <= points.shape[0]:
        raise ValueError(f"cannot split {points.shape[0]} points into {count} clusters")
    best_labels: list[int] = []
    best_inertia = float("inf")
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + restart)
        labels, inertia = _lloyd(points, _kmeans_plus_plus(points, count, generator), iterations)
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    return _relabel_by_first_member(best_labels)


def _kmeans_plus_plus(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    for _ in range(1, count):
        distances = torch.cdist(points, points[chosen]).min(dim=1).values.square()
        distances[chosen] = 0.0
        if float(distances.sum()) > 0.0:
            pick = int(torch.multinomial(distances, 1, generator=generator))
        else:
            # Every remaining point coincides with a seed (identical experts), so any unchosen one will do.
            remaining = [index for index in range(points.shape[0]) if index not in chosen]
            pick = remaining[int(torch.randint(len(remaining), (1,), generator=generator))]
        chosen.append(pick)
    return points[chosen].clone()


def _lloyd(points: torch.Tensor, centroids: torch.Tensor, iterations: int) -> tuple[list[int], float]:
    count = centroids.shape[0]
    labels = torch.cdist(points, centroids).argmin(dim=1)
    for _ in range(iterations):
        for cluster in range(count):
            members = labels == cluster
            if members.any():
                centroids[cluster] = points[members].mean(dim=0)
        updated = torch.cdist(points, centroids).argmin(dim=1)
        if torch.equal(updated, labels):
            break
        labels = updated
    labels = _fill_empty_clusters(points, labels, count)
    inertia = sum(float((points[labels == cluster] - points[labels == cluster].mean(dim=0)).square().sum())
                  for cluster in range(count))
    return labels.tolist(), inertia


def _fill_empty_clusters(points: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Move the point farthest from its centroid, among clusters of two or more, into each empty cluster."""
    labels = labels.clone()
    for cluster in range(count):
        if (labels == cluster).any():
            continue
        sizes = torch.bincount(labels, minlength=count)
        centroids = torch.stack([points[labels == c].mean(dim=0) if sizes[c] else points[0] for c in range(count)])
        distances = (points - centroids[labels]).norm(dim=1)
        distances[sizes[labels] < 2] = -1.0
        # Ties go to the highest index, so the lowest member of a cluster of identical points stays put.
        farthest = int(max(range(points.shape[0]), key=lambda index: (float(distances[index]), index)))
        labels[farthest] = cluster
    return labels


def _relabel_by_first_member(labels: list[int]) -> list[int]:
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(label, len(order))
    return [order[label] for label in labels]


def cluster_experts(usage: torch.Tensor, similarity: torch.Tensor, count: int, *, seed: int,
                    restarts: int = 10) -> list[ExpertGroup]:
    """Cluster E experts into `count` groups by k-means on the rows of 1 − Sim, weighted by usage.

    Each group lists its most used member first (ties to the lower index), then the others in index
    order. Groups come in the index order of that first member.
    """
    labels = kmeans(1.0 - similarity.double(), count, seed=seed, restarts=restarts)
    groups = []
    for cluster in range(count):
        members = [expert for expert, label in enumerate(labels) if label == cluster]
        first = min(members, key=lambda expert: (-float(usage[expert]), expert))
        ordered = (first, *sorted(expert for expert in members if expert != first))
        total = sum(float(usage[expert]) for expert in ordered)
        if total > 0.0:
            weights = tuple(float(usage[expert]) / total for expert in ordered)
        else:
            weights = tuple(1.0 / len(ordered) for _ in ordered)
        groups.append(ExpertGroup(ordered, weights))
    return sorted(groups, key=lambda group: group.dominant)


def subspace_merge(matrices: Sequence[torch.Tensor], weights: Sequence[float], *, rank: int = 0,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge same-shaped matrices (out × in) in their joint left-singular subspace, keeping `rank` triplets.

    `rank` 0, or any rank at or above min(out, n·in), keeps every triplet, which gives Σ_i ω_i W_i.
    The SVD runs in float64 and the result is cast to `compute_dtype`.
    """
    if len(matrices) != len(weights):
        raise ValueError(f"{len(matrices)} matrices but {len(weights)} weights")
    if rank < 0:
        raise ValueError(f"rank must be 0 (full) or positive, got {rank}")
    if len(matrices) == 1:
        return matrices[0].to(compute_dtype)

    # 1. Joint SVD of the concatenation: every expert shares U and keeps its own block of Vᵀ.
    columns = matrices[0].shape[1]
    joined = torch.cat([matrix.double() for matrix in matrices], dim=1)
    u, s, vh = torch.linalg.svd(joined, full_matrices=False)

    # 2. Frequency-weighted mean of the Vᵀ blocks, then truncation to the leading `rank` triplets.
    merged_vh = sum(weight * vh[:, index * columns:(index + 1) * columns] for index, weight in enumerate(weights))
    kept = s.numel() if rank == 0 else min(rank, s.numel())
    return ((u[:, :kept] * s[:kept]) @ merged_vh[:kept]).to(compute_dtype)
