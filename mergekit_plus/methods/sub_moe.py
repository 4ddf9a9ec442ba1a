"""Sub-MoE expert merging: experts clustered by their outputs, then merged in a shared subspace.

Li et al., Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging,
arXiv:2506.23266. The formulas are in `mergekit_plus/moe/subspace.py`.

Like mc_smoe, this method has no tensor operator: the executor hands the plan to
`mergekit_plus.moe.execute.run_moe`, which runs the calibration forward pass (routing counts and
every expert's output on every token), clusters each layer's experts, then reads, merges and
writes one MoE layer at a time. Not covered: the paper's adaptive per-layer cluster count, because
a transformers config holds one expert count for every layer, and the factorised (U_r Σ_r, V̄_r)
output experts, because transformers cannot load them. The paper's router rule could not be
checked, so the new router rows follow the zhy617/SMoE re-implementation (frequency-weighted mean).
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekit_plus.methods.base import REQUIRED, MergeTarget, Param, varying_param_problem
from mergekit_plus.methods.mc_smoe import ROUTER_ROWS, MoeMergeMethod, moe_target_problems, reject_tensor_call

PARAMS = (
    Param("num_experts", int, REQUIRED, "Experts per MoE layer after merging (K clusters); at most the current "
          "count.", minimum=1),
    Param("calibration", str, REQUIRED,
          "Calibration text for the expert outputs and routing counts: a path or glob pattern of .jsonl files "
          "(one object per line with `text`, `prompt`, `input` or `content`) or text files (one text per line), "
          "relative to the current folder."),
    Param("calibration_samples", int, 256, "How many calibration texts to run from the start of each calibration file.",
          minimum=1),
    Param("max_tokens", int, 512, "Tokens per calibration text; longer texts are truncated.", minimum=1),
    Param("rank", int, 0,
          "Singular triplets kept per merged weight matrix; 0 keeps all of them, which equals "
          "frequency-weighted averaging of the cluster's experts.", minimum=0),
    Param("align", bool, False,
          "Permute each member's intermediate neurons to match the cluster's most used expert before the joint "
          "SVD, as mc_smoe does. Sub-MoE itself does not align."),
    Param("router_row", str, "weighted_mean",
          "How a cluster's router row is formed: `weighted_mean` averages the members' rows with the merge "
          "weights, `dominant` keeps the most used member's row.", choices=ROUTER_ROWS),
    Param("kmeans_restarts", int, 10,
          "k-means runs from different k-means++ seeds per layer; the one with the least within-cluster "
          "sum of squares is kept. Seeded by the recipe's `seed` and the layer index.", minimum=1),
)


def _check_sub_moe_model(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that the parameters are one value for the whole merge and that one model is listed."""
    problems: list[str] = []
    if not targets:
        return problems
    problems += [problem for param in PARAMS if (problem := varying_param_problem(targets, param.name))]
    if len(targets[0].model_params) != 1:
        problems.append(f"sub_moe merges the experts of one model, but the recipe lists "
                        f"{len(targets[0].model_params)}; list only the MoE checkpoint under `models:`")
    problems += moe_target_problems("sub_moe", targets)
    return problems


METHOD = MoeMergeMethod(
    name="sub_moe",
    title="Sub-MoE expert merging",
    paper="Li et al., Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging, "
          "arXiv:2506.23266",
    summary="Merges each MoE layer's experts into fewer ones: k-means on the similarity of expert outputs, "
            "then a joint SVD per cluster with a shared U and frequency-weighted V blocks, at a chosen rank.",
    requires_base=False,
    operator=reject_tensor_call("sub_moe"),
    params=PARAMS,
    check_model=_check_sub_moe_model,
)
