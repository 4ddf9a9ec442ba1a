"""The math of MC-SMoE expert merging, as pure functions over small tensors.

Li et al., Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy,
ICLR 2024, arXiv:2310.01334. Per MoE layer with E experts merged into K:

1. usage f_e = (tokens routed to e) / (routed token slots), counting every top-k pick;
2. similarity S_ij = cos(r_i, r_j), with r_i the router logits of expert i over all calibration tokens;
3. the K most used experts are dominant and each starts a group. Every other expert joins the
   group of the dominant expert it is most similar to;
4. each member is aligned to its group's dominant expert by a permutation of its intermediate
   neurons (a maximising linear assignment on C = Σ W_inᵈ W_inᵉᵀ + W_outᵈᵀ W_outᵉ);
5. the group's expert is W̄ = Σ_e w_e W_e with w_e = f_e / Σ_{e∈g} f_e.

A group whose members were never routed to gets uniform weights, where the reference code's
`f / (Σf + 1e-7)` would write a zero expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class ExpertGroup:
    """Experts merged into one: the dominant expert first, then the others in index order."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    """Merge weight of each member, summing to 1."""

    @property
    def dominant(self) -> int:
        return self.members[0]


def dominant_experts(usage: torch.Tensor, count: int) -> list[int]:
    """Return the `count` most used experts in index order; ties go to the lower index."""
    order = sorted(range(usage.numel()), key=lambda expert: (-float(usage[expert]), expert))
    return sorted(order[:count])


def group_by_similarity(usage: torch.Tensor, similarity: torch.Tensor, count: int) -> list[ExpertGroup]:
    """Group E experts into `count` groups around the most used ones, weighted by usage.

    Groups come in the index order of their dominant experts, so a layer that keeps every expert
    keeps their order.
    """
    dominants = dominant_experts(usage, count)
    members: dict[int, list[int]] = {expert: [expert] for expert in dominants}
    for expert in range(usage.numel()):
        if expert in members:
            continue
        # Ties in similarity go to the lower-index dominant expert.
        best = max(dominants, key=lambda dominant: (float(similarity[expert, dominant]), -dominant))
        members[best].append(expert)
    return [_weighted_group(members[dominant], usage) for dominant in dominants]


def groups_of_dominants_only(usage: torch.Tensor, count: int) -> list[ExpertGroup]:
    """Keep the `count` most used experts and drop the rest: the baseline that merges nothing."""
    return [ExpertGroup((expert,), (1.0,)) for expert in dominant_experts(usage, count)]


def random_groups(num_experts: int, count: int, *, seed: int) -> list[ExpertGroup]:
    """Split the experts into `count` random groups of near-equal size with uniform weights.

    The first member of each group (the lowest index) serves as its dominant expert.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_experts, generator=generator).tolist()
    groups = []
    for index in range(count):
        chosen = sorted(order[index::count])
        groups.append(ExpertGroup(tuple(chosen), tuple(1.0 / len(chosen) for _ in chosen)))
    return sorted(groups, key=lambda group: group.dominant)


def _weighted_group(experts: list[int], usage: torch.Tensor) -> ExpertGroup:
    ordered = (experts[0], *sorted(experts[1:]))
    total = sum(float(usage[expert]) for expert in ordered)
    if total <= 0.0:
        weights = tuple(1.0 / len(ordered) for _ in ordered)
    else:
        weights = tuple(float(usage[expert]) / total for expert in ordered)
    return ExpertGroup(ordered, weights)


def router_logit_similarity(gram: torch.Tensor) -> torch.Tensor:
    """Return the cosine similarity of router-logit columns from their Gram matrix LᵀL (E × E).

    An expert whose logits are all zero has similarity 0 to every other expert.
    """
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    denominator = torch.outer(norms, norms)
    return torch.where(denominator > 0, gram / denominator.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)


def align_to(reference: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor], *,
             input_roles: Sequence[str], output_role: str) -> torch.Tensor:
    """Return the permutation of `expert`'s intermediate neurons that best matches `reference`.

    Input projections are d_ff × d_model and the output projection is d_model × d_ff. Neuron j
    of the permuted expert is neuron `permutation[j]` of the original. Rows of the input
    projections and columns of the output projection move together, so the expert's function
    is unchanged. The cost C = Σ W_inʳ W_inᵉᵀ + W_outʳᵀ W_outᵉ is maximised by the Hungarian
    method (scipy.optimize.linear_sum_assignment), in float64.
    """
    cost = reference[output_role].double().T @ expert[output_role].double()
    for role in input_roles:
        cost += reference[role].double() @ expert[role].double().T
    rows, columns = linear_sum_assignment(cost.numpy(), maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.int64)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(columns, dtype=torch.int64)
    return permutation


def permute_expert(expert: Mapping[str, torch.Tensor], permutation: torch.Tensor, *,
                   input_roles: Sequence[str], output_role: str) -> dict[str, torch.Tensor]:
    """Return a copy of `expert` with its intermediate neurons in `permutation` order."""
    permuted = {role: expert[role][permutation] for role in input_roles}
    permuted[output_role] = expert[output_role][:, permutation]
    return permuted


def merge_group(experts: Sequence[Mapping[str, torch.Tensor]], group: ExpertGroup, *, input_roles: Sequence[str],
                output_role: str, align: bool, compute_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Merge one group's experts into one: align each member to the dominant, then average by weight.

    `experts` contains every expert of the layer by index, each a mapping from role to weight.
    A group of one expert returns that expert's weights unchanged (converted to `compute_dtype`).
    """
    dominant = {role: tensor.to(compute_dtype) for role, tensor in experts[group.dominant].items()}
    merged = {role: tensor * group.weights[0] for role, tensor in dominant.items()}
    if len(group.members) == 1:
        return dominant
    for member, weight in zip(group.members[1:], group.weights[1:]):
        expert = {role: tensor.to(compute_dtype) for role, tensor in experts[member].items()}
        if align:
            permutation = align_to(dominant, expert, input_roles=input_roles, output_role=output_role)
            expert = permute_expert(expert, permutation, input_roles=input_roles, output_role=output_role)
        for role, tensor in expert.items():
            merged[role] += weight * tensor
    return merged


def router_rows(router: torch.Tensor, groups: Sequence[ExpertGroup], *, rule: str,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the merged router (one row per group) from the E-row router.

    `dominant` keeps the dominant expert's row. Under top-k renormalisation (Mixtral), a token
    whose top-k experts are all dominant then gets the same experts with the same weights.
    `weighted_mean` uses Σ_e w_e r_e, the group's merge weights applied to the router rows.
    """
    rows = []
    for group in groups:
        if rule == "dominant":
            rows.append(router[group.dominant].to(compute_dtype))
        elif rule == "weighted_mean":
            weights = torch.tensor(group.weights, dtype=compute_dtype)
            rows.append(weights @ router[list(group.members)].to(compute_dtype))
        else:
            raise ValueError(f"unknown router row rule {rule!r}; expected dominant or weighted_mean")
    return torch.stack(rows)
