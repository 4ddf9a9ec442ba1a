"""Tests of the TALL masks and the multi-task vector they are built on."""

from __future__ import annotations

import numpy
import pytest
import torch

from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.methods.chunks import CHUNK_NUMEL, TaskVectors
from mergekit_plus.methods.tall_masks import (
    AUTO,
    DEFAULT_MASK_LAMBDA,
    INNER_PARAMS,
    LAMBDA_GRID,
    METHOD,
    PAPER_LAMBDA_GRID,
    apply_mask,
    bundle_entry,
    check_inner_params,
    choose_lambda,
    mask_counts,
    multi_task_vector,
    pack_mask,
    packed_size,
    parse_lambda_grid,
    rebuild_task,
    searched_models,
    select_lambda,
    task_masks,
    unpack_mask,
)
from mergekit_plus.recipe.validate import check_param_value
from reference_vectors import BASE, TASK_VECTORS

# Three task vectors of six entries. Their sum is τ_MTL = [0.4, −0.4, −0.45, 0.2, 0.2, 0.07], and
# the masks m_t = 1[|τ_t| > λ · |τ_MTL − τ_t|] below were worked out by hand.
MULTI_TASK_SUM = [0.4, -0.4, -0.45, 0.2, 0.2, 0.07]
MASKS = {
    0.4: [[1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
    # At λ = 1, |τ₁| = |τ_MTL − τ₁| = 0.2 at index 1, and the strict ">" drops that entry.
    1.0: [[1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
}


def inner_params(**overrides):
    return {p.name: p.default for p in INNER_PARAMS if not p.per_model} | overrides


def task_vectors(dtype=torch.float64):
    return [torch.tensor(row, dtype=dtype) for row in TASK_VECTORS]


@pytest.mark.parametrize("mask_lambda", sorted(MASKS))
def test_masks_match_hand_computed(mask_lambda):
    masks = task_masks(task_vectors(), torch.tensor(MULTI_TASK_SUM, dtype=torch.float64), [mask_lambda] * 3)

    assert [mask.dtype for mask in masks] == [torch.bool] * 3
    assert [mask.int().tolist() for mask in masks] == MASKS[mask_lambda]


def test_masks_take_one_lambda_per_task():
    multi_task = torch.tensor(MULTI_TASK_SUM, dtype=torch.float64)

    masks = task_masks(task_vectors(), multi_task, [0.4, 1.0, 0.4])

    assert [mask.int().tolist() for mask in masks] == [MASKS[0.4][0], MASKS[1.0][1], MASKS[0.4][2]]


def test_lambda_zero_keeps_every_nonzero_entry():
    masks = task_masks(task_vectors(), torch.tensor(MULTI_TASK_SUM, dtype=torch.float64), [0.0] * 3)

    for mask, row in zip(masks, TASK_VECTORS):
        assert mask.tolist() == [value != 0 for value in row]


def test_mask_counts_per_entry():
    masks = [torch.tensor(row, dtype=torch.bool) for row in MASKS[0.4]]

    counts = mask_counts(masks)

    assert counts.tolist() == [3, 2, 1, 1, 1, 2]


def test_multi_task_sum_of_task_vectors():
    base = torch.tensor(BASE, dtype=torch.float64)
    inputs = TaskVectors(base, [base + delta for delta in task_vectors()], torch.float64)

    multi_task = multi_task_vector(inputs, inner_params(), [{"density": 0.2}] * 3, None)

    torch.testing.assert_close(multi_task, torch.tensor(MULTI_TASK_SUM, dtype=torch.float64))


def test_multi_task_ties_dis_sum_in_tensor_scope():
    """Density 0.5 per tensor keeps three entries of each row, and the dis-sum was worked out by hand.

    τ̂₁ = [0.5, −0.2, 0, 0, 0.3, 0], τ̂₂ = [−0.4, −0.3, 0, 0.2, 0, 0],
    τ̂₃ = [0.3, 0, −0.6, 0, −0.1, 0] (of the tied 0.1 and −0.1, the lower index stays).
    No trimmed row keeps index 5, so the sum there is 0.
    """
    base = torch.tensor(BASE, dtype=torch.float64)
    inputs = TaskVectors(base, [base + delta for delta in task_vectors()], torch.float64)

    multi_task = multi_task_vector(inputs, inner_params(inner="ties", scope="tensor"), [{"density": 0.5}] * 3, None)

    torch.testing.assert_close(multi_task, torch.tensor([0.8, -0.5, -0.6, 0.2, 0.3, 0.0], dtype=torch.float64))


def test_ties_model_scope_needs_thresholds():
    base = torch.zeros(6, dtype=torch.float64)
    inputs = TaskVectors(base, [base + delta for delta in task_vectors()], torch.float64)

    with pytest.raises(ValueError, match="needs one whole-model trim threshold per model"):
        multi_task_vector(inputs, inner_params(inner="ties"), [{"density": 0.5}] * 3, None)


def test_unknown_inner_rejected():
    base = torch.zeros(6, dtype=torch.float64)
    inputs = TaskVectors(base, [base + delta for delta in task_vectors()], torch.float64)

    with pytest.raises(ValueError, match="inner must be one of"):
        multi_task_vector(inputs, inner_params(inner="dare"), [{"density": 0.2}] * 3, None)


def test_ties_settings_rejected_without_ties():
    problems = check_inner_params(inner_params(normalize=True), [{"density": 0.5}, {"density": 0.2}])

    assert len(problems) == 1
    assert "`normalize`, `density` apply only with `inner: ties`" in problems[0]


def test_ties_settings_accepted_with_ties():
    assert check_inner_params(inner_params(inner="ties", normalize=True), [{"density": 0.5}]) == []


def test_default_mask_lambda_mid_grid():
    assert DEFAULT_MASK_LAMBDA == 0.4


# The `tall_masks` bundle: bit-packed masks and the rebuilt task models


def bundle_params(**overrides):
    return {p.name: p.default for p in METHOD.global_params} | overrides


@pytest.mark.parametrize("numel", [1, 5, 7, 8, 9, 13, 64, 1001])
def test_pack_mask_matches_numpy_packbits(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5

    packed = pack_mask(mask)

    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(numel)
    assert packed.tolist() == numpy.packbits(mask.numpy()).tolist()


@pytest.mark.parametrize("numel", [1, 5, 7, 8, 9, 13, 64, 1001])
def test_mask_round_trips_through_packing(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.3

    assert torch.equal(unpack_mask(pack_mask(mask), numel), mask)


def test_pack_mask_flattens_row_major():
    mask = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])

    assert pack_mask(mask).tolist() == [0b10000000, 0b10000000]


def test_unpack_mask_rejects_wrong_size():
    with pytest.raises(ValueError, match="a packed mask of 9 entries has 2 bytes, got 1"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), 9)


@pytest.mark.parametrize("mask_lambda", sorted(MASKS))
def test_bundle_entry_masks_hand_computed(mask_lambda):
    base = torch.tensor(BASE, dtype=torch.float64)
    models = [base + delta for delta in task_vectors()]

    entry = bundle_entry(base, models, params=bundle_params(), model_params=[{"mask_lambda": mask_lambda}] * 3,
                         compute_dtype=torch.float64)

    torch.testing.assert_close(entry.multi_task, torch.tensor(MULTI_TASK_SUM, dtype=torch.float64))
    assert [unpack_mask(packed, 6).int().tolist() for packed in entry.masks] == MASKS[mask_lambda]
    assert list(entry.kept) == [sum(row) for row in MASKS[mask_lambda]]


@pytest.mark.parametrize("mask_lambda", sorted(MASKS))
def test_apply_mask_rebuilds_hand_computed_task(mask_lambda):
    base = torch.tensor(BASE, dtype=torch.float64)
    entry = bundle_entry(base, [base + delta for delta in task_vectors()], params=bundle_params(),
                         model_params=[{"mask_lambda": mask_lambda}] * 3, compute_dtype=torch.float64)

    for packed, mask in zip(entry.masks, MASKS[mask_lambda]):
        rebuilt = apply_mask(base, entry.multi_task, packed, torch.float64)
        expected = [b + m * t for b, m, t in zip(BASE, mask, MULTI_TASK_SUM)]
        torch.testing.assert_close(rebuilt, torch.tensor(expected, dtype=torch.float64))


def test_all_ones_masks_give_task_arithmetic():
    """With λ_t = 0 and no zero task-vector entry, every mask keeps everything: θ₀ + τ_MTL = TA with λ = 1."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=generator)
    models = [base + torch.randn(5, 7, generator=generator) * 0.1 for _ in range(3)]

    entry = bundle_entry(base, models, params=bundle_params(), model_params=[{"mask_lambda": 0.0}] * 3)

    task_arithmetic = base + sum(model - base for model in models)
    for packed in entry.masks:
        assert bool(unpack_mask(packed, 35).all())
        torch.testing.assert_close(apply_mask(base, entry.multi_task, packed), task_arithmetic)


def test_masks_cross_chunk_boundary():
    """A tensor of CHUNK_NUMEL + 13 entries packs its last, partial byte after a whole chunk."""
    numel = CHUNK_NUMEL + 13
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(numel, generator=generator)
    models = [base + torch.randn(numel, generator=generator) for _ in range(2)]

    entry = bundle_entry(base, models, params=bundle_params(), model_params=[{"mask_lambda": 0.4}] * 2)

    deltas = [model - base for model in models]
    expected = task_masks(deltas, deltas[0] + deltas[1], [0.4, 0.4])
    for packed, mask in zip(entry.masks, expected):
        assert torch.equal(unpack_mask(packed, numel), mask)


def test_bundle_entry_leaves_inputs_unchanged():
    base = torch.tensor(BASE, dtype=torch.float32)
    models = [base + delta.float() for delta in task_vectors()]
    copies = [base.clone(), *(model.clone() for model in models)]

    bundle_entry(base, models, params=bundle_params(), model_params=[{"mask_lambda": 0.4}] * 3)

    for before, after in zip(copies, [base, *models]):
        assert torch.equal(before, after)


def test_bundle_method_operator_rejected():
    base = torch.zeros(2)

    with pytest.raises(NotImplementedError, match="tall_masks has no single merged tensor"):
        METHOD.operator(base, [base], params=bundle_params(), model_params=[{"mask_lambda": 0.4}], seeds=())


def test_bundle_method_declares_bundle_output():
    assert METHOD.output_kind == "bundle"
    assert METHOD.requires_base


# Choosing λ_t on data: the grid, the choice among equal scores, and the rebuilt tensors that are scored


@pytest.mark.parametrize("mask_lambda", sorted(MASKS))
def test_rebuild_task_matches_hand_computed(mask_lambda):
    """A zero base keeps the task vectors exact, so the masks are the hand-computed ones."""
    base = torch.zeros(6, dtype=torch.float64)
    multi_task = torch.tensor(MULTI_TASK_SUM, dtype=torch.float64)

    for task, mask in zip(task_vectors(), MASKS[mask_lambda]):
        rebuilt = rebuild_task(base, task, multi_task, mask_lambda, compute_dtype=torch.float64)
        expected = [m * t for m, t in zip(mask, MULTI_TASK_SUM)]
        torch.testing.assert_close(rebuilt, torch.tensor(expected, dtype=torch.float64))


def test_rebuild_task_equals_extract_in_bfloat16():
    """Rounded to the stored dtype first, the rebuilt tensor is what `apply_mask` rebuilds from the bundle."""
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(CHUNK_NUMEL + 5, generator=generator)
    models = [base + 0.1 * torch.randn(base.shape, generator=generator) for _ in range(3)]
    entry = bundle_entry(base, models, params=bundle_params(), model_params=[{"mask_lambda": 0.5}] * 3)

    rebuilt = rebuild_task(base, models[1], entry.multi_task, 0.5, stored_dtype=torch.bfloat16)

    extracted = apply_mask(base.to(torch.bfloat16), entry.multi_task.to(torch.bfloat16), entry.masks[1])
    assert torch.equal(rebuilt.to(torch.bfloat16), extracted.to(torch.bfloat16))


def test_rebuild_task_adds_stored_multi_task():
    base = torch.zeros(6, dtype=torch.float64)
    multi_task = torch.tensor(MULTI_TASK_SUM, dtype=torch.float64)
    clamped = multi_task.clamp(-0.3, 0.3)

    rebuilt = rebuild_task(base, task_vectors()[0], multi_task, 0.4, compute_dtype=torch.float64,
                           stored_multi_task=clamped)

    expected = [m * t for m, t in zip(MASKS[0.4][0], clamped.tolist())]
    torch.testing.assert_close(rebuilt, torch.tensor(expected, dtype=torch.float64))


def close_entries(mask_lambda: float) -> int:
    """A stand-in scorer: the entries where the rebuilt task 1 lies within 0.15 of its fine-tune.

    Worked out by hand: λ = 0 keeps [1,1,1,0,1,1] and 4 entries are close; λ = 0.4 and λ = 1 both
    leave 5 close (entry 1 misses by 0.2 in both).
    """
    base = torch.zeros(6, dtype=torch.float64)
    fine_tune = task_vectors()[0]
    rebuilt = rebuild_task(base, fine_tune, torch.tensor(MULTI_TASK_SUM, dtype=torch.float64), mask_lambda,
                           compute_dtype=torch.float64)
    return int(((rebuilt - fine_tune).abs() <= 0.15).sum())


def test_select_lambda_hand_made_scores():
    chosen, scores = select_lambda([0.0, 1.0, 0.4], close_entries)

    assert scores == [(0.0, 4), (1.0, 5), (0.4, 5)]
    assert chosen == 0.4


def test_select_lambda_first_keeps_grid_order():
    chosen, _ = select_lambda([0.0, 1.0, 0.4], close_entries, tie_break="first")

    assert chosen == 1.0


@pytest.mark.parametrize(("scores", "expected"), [
    ([(0.2, 3), (0.3, 5), (0.6, 4)], 0.3),
    ([(0.2, 5), (0.5, 5), (0.6, 5)], 0.5),
    ([(0.3, 5), (0.5, 5)], 0.3),
    ([(0.7, 2), (0.9, 2)], 0.7),
])
def test_choose_lambda_prefers_best_then_nearest_default(scores, expected):
    assert choose_lambda(scores) == expected


def test_choose_lambda_rejects_unknown_tie_break():
    with pytest.raises(ValueError, match="tie_break must be one of"):
        choose_lambda([(0.4, 1)], tie_break="last")


def test_lambda_grid_default_is_paper_grid():
    assert parse_lambda_grid(LAMBDA_GRID.default) == PAPER_LAMBDA_GRID


@pytest.mark.parametrize(("text", "message"), [
    ("0.2, x", "must be numbers separated by commas"),
    ("", "must be numbers separated by commas"),
    ("0.2, -0.1", "must be finite and at least 0"),
    ("0.2, nan", "must be finite and at least 0"),
    ("0.2, 0.3, 0.2", "lists 0.2 twice"),
])
def test_lambda_grid_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lambda_grid(text)


def test_bundle_entry_rejects_auto():
    base = torch.zeros(6, dtype=torch.float64)

    with pytest.raises(ValueError, match="mask_lambda is auto for this tensor"):
        bundle_entry(base, [base + delta for delta in task_vectors()], params=bundle_params(),
                     model_params=[{"mask_lambda": 0.4}, {"mask_lambda": AUTO}, {"mask_lambda": 0.4}])


def selection_targets(lambdas, **params):
    values = bundle_params(**params)
    return [MergeTarget(name, values, tuple({"mask_lambda": value, "density": 0.2} for value in row), (6,) * len(row))
            for name, row in lambdas.items()]


def test_searched_models_finds_auto_on_any_tensor():
    targets = selection_targets({"a": [0.4, AUTO, 0.3], "b": [AUTO, 0.4, 0.3]})

    assert searched_models(targets) == [0, 1]


def test_lambda_grid_without_auto_rejected():
    problems = METHOD.check_model(selection_targets({"a": [0.4, 0.4]}, lambda_grid="0.1, 0.2"))

    assert problems == ["`lambda_grid` applies only with `mask_lambda: auto`, but no model's `mask_lambda` is auto; "
                        "remove it or set `mask_lambda: auto`"]


def test_bad_lambda_grid_reported_once():
    problems = METHOD.check_model(selection_targets({"a": [AUTO], "b": [AUTO]}, lambda_grid="0.1, x"))

    assert len(problems) == 1
    assert "`lambda_grid` must be numbers separated by commas" in problems[0]


def test_mask_lambda_takes_auto_keyword():
    param = METHOD.param("mask_lambda")

    assert param.keywords == (AUTO,)
    assert param.per_model
    assert param.default == DEFAULT_MASK_LAMBDA
    assert check_param_value(param, AUTO) == []
    assert check_param_value(param, "autp") == ["`mask_lambda` must be a number or `auto`, got 'autp'"]
    assert check_param_value(param, [0.2, AUTO]) == ["`mask_lambda: auto` cannot be part of a gradient list; give it "
                                                     "alone"]
