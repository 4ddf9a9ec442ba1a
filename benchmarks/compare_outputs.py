"""Compare two merged checkpoints tensor by tensor and report the differences per tensor kind.

Tensors are read one at a time with ``safetensors.safe_open``, so memory stays at a few
tensors. A tensor kind is the tensor name with its layer index replaced by ``N``, for
example ``model.layers.N.mlp.up_proj.weight``. For each kind the report gives the share of
elements that differ, the maximum absolute difference, and, for bfloat16 and float16
outputs, the maximum distance in ulps (units in the last place of the stored dtype). A
distance of one ulp is a rounding difference.

With ``--inputs`` and ``--density``, the script also tests where the differences of a TIES
merge come from. It recomputes each model's task vector ``delta_i = model_i - base`` in
float32 and the magnitude at which the trim cuts:

- ``--scope tensor`` (default, mergekit's trim): per tensor, the k-th largest |delta_i| with
  k = int(density * numel) as mergekit counts it. Entries above it are kept.
- ``--scope model`` (the TIES paper's trim, used by ``scope: model`` and by FusionBench): over
  every tensor at once, the (d - k)-th smallest |delta_i| of the model's d entries, with
  k = floor(density * d). Entries at or above it are kept. An exact radix select over the
  float32 bit patterns finds it in one or two passes over the inputs.

Each differing element falls in one of four classes:

- "tie": some model's |delta_i| equals that model's cut-off magnitude, so which of the
  equal entries the trim keeps depends on how the implementation orders equal keys;
- "zero sum": the trimmed task vectors are not all zero but their weighted sum is exactly 0,
  so the elected sign depends on the implementation's rule for a zero sum;
- "rounding": neither, and the two values are one ulp of the stored dtype apart, as float
  sums taken in another order and then rounded to that dtype can be;
- "other": none of these. Such elements point to a real divergence and are listed by tensor.

With the per-tensor trim a tie makes the kept set itself uncertain, so "tie" comes first and
"zero sum" counts only positions without a tie. The whole-model trim keeps every entry tied
with the cut-off, so its kept set is certain and "zero sum" comes first. A position counts as
"tie" there only when its sum is not 0, which would point to implementations that count k
differently.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open

ULP_DTYPES = (torch.bfloat16, torch.float16)
LAYER_INDEX = re.compile(r"\.\d+\.")


@dataclass
class KindStats:
    kind: str
    tensors: int = 0
    elements: int = 0
    differing: int = 0
    differing_tied: int = 0
    differing_zero_sum: int = 0
    differing_rounding: int = 0
    max_abs_diff: float = 0.0
    max_abs_value: float = 0.0
    max_ulp_diff: float = 0.0
    max_ulp_diff_other: float = 0.0


class CheckpointReader:
    """Lazy reader of a Hugging Face safetensors checkpoint folder, single-file or sharded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.exists():
            self.weight_map = json.loads(index_path.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                self.weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file_name = self.weight_map[name]
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(self.folder / file_name, framework="pt")
        return self._handles[file_name].get_tensor(name)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return |a - b| in ulps of the stored dtype at max(|a|, |b|). One ulp is a rounding difference.

    Counting in ulps of the larger magnitude keeps the measure meaningful where a and b have
    opposite signs near zero, where a count of representable values in between would be huge.
    """
    a32, b32 = a.float(), b.float()
    magnitude = torch.maximum(a32.abs(), b32.abs())
    # frexp gives magnitude = mantissa * 2**exponent with mantissa in [0.5, 1), so the ulp at
    # magnitude is eps * 2**(exponent - 1). Zero and subnormals use the ulp of the smallest normal.
    _, exponent = torch.frexp(magnitude.clamp_min(torch.finfo(a.dtype).tiny))
    ulp = torch.finfo(a.dtype).eps * torch.exp2((exponent - 1).float())
    return (a32 - b32).abs_().div_(ulp)


def model_cutoffs(inputs: list[CheckpointReader], names: list[str], density: float) -> tuple[list[float], dict]:
    """Return each model's whole-model trim cut-off and how it was counted. inputs[0] is the base.

    The cut-off of model i is the (d - k)-th smallest |delta_i| over the d entries of every
    tensor in `names`, with k = floor(density * d) taken exactly in decimal, as mergekit_plus
    counts it. Non-negative float32 values order like their bit patterns read as integers. So a
    histogram of the top 16 bits finds the bin that contains the cut-off. A histogram of the low
    16 bits inside that bin then finds the value itself. It is needed only when some entries of
    the bin have low bits set.
    """
    def magnitudes(reader: CheckpointReader, name: str) -> torch.Tensor:
        delta = reader.get(name).float() - inputs[0].get(name).float()
        return delta.abs_().flatten().view(torch.int32)

    models = inputs[1:]
    d = sum(inputs[0].get(name).numel() for name in names)
    k = math.floor(Fraction(str(density)) * d)
    rank = d - k  # 1-based rank from the smallest; k = 0 selects the largest entry.
    high_counts = [torch.zeros(1 << 15, dtype=torch.int64) for _ in models]
    low_bits_set = [torch.zeros(1 << 15, dtype=torch.int64) for _ in models]
    for name in names:
        for index, reader in enumerate(models):
            bits = magnitudes(reader, name)
            high = bits >> 16
            high_counts[index] += torch.bincount(high, minlength=1 << 15)
            low_bits_set[index] += torch.bincount(high[(bits & 0xFFFF) != 0], minlength=1 << 15)

    cutoffs, bins = [], []
    for index in range(len(models)):
        cumulative = torch.cumsum(high_counts[index], 0)
        high_bin = int(torch.searchsorted(cumulative, rank))
        below = int(cumulative[high_bin - 1]) if high_bin else 0
        bins.append((high_bin, rank - below))
    pending = [index for index, (high_bin, _) in enumerate(bins) if low_bits_set[index][high_bin]]
    low_counts = {index: torch.zeros(1 << 16, dtype=torch.int64) for index in pending}
    for name in names if pending else []:
        for index in pending:
            bits = magnitudes(models[index], name)
            inside = bits[(bits >> 16) == bins[index][0]]
            low_counts[index] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    for index, (high_bin, rank_in_bin) in enumerate(bins):
        low = 0
        if index in low_counts:
            low = int(torch.searchsorted(torch.cumsum(low_counts[index], 0), rank_in_bin))
        pattern = torch.tensor([(high_bin << 16) | low], dtype=torch.int32)
        cutoffs.append(float(pattern.view(torch.float32)))
    counting = {
        "entries": d,
        "k": k,
        # FusionBench and the TIES authors' code count k with a double product.
        "k_double_product": int(d * density),
        "low_bit_passes": 1 if pending else 0,
    }
    return cutoffs, counting


def classify_positions(inputs: list[CheckpointReader], name: str, weights: list[float], *,
                       density: float | None = None, cutoffs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the disjoint masks of the "tie" and "zero sum" positions of one tensor. inputs[0] is the base.

    With `cutoffs` (one per model, from `model_cutoffs`), entries at or above the cut-off are
    kept, as in the whole-model trim. Otherwise each model's cut-off is the tensor's k-th
    largest |delta| with k = int(density * numel), and only entries above it count as kept.
    """
    base = inputs[0].get(name).float()
    numel = base.numel()
    tied = torch.zeros(base.shape, dtype=torch.bool)
    any_kept = torch.zeros(base.shape, dtype=torch.bool)
    weighted_sum = torch.zeros(base.shape, dtype=torch.float32)
    for index, (reader, weight) in enumerate(zip(inputs[1:], weights)):
        delta = reader.get(name).float() - base
        magnitude = delta.abs()
        if cutoffs is not None:
            cutoff = torch.tensor(cutoffs[index])
            kept = magnitude >= cutoff
        else:
            k = max(1, int(density * numel))
            # The k-th largest value is the (numel - k + 1)-th smallest.
            cutoff = torch.kthvalue(magnitude.flatten(), numel - k + 1).values
            # Away from ties the trim is unambiguous: entries above the cut-off stay.
            kept = magnitude > cutoff
        tied |= magnitude == cutoff
        any_kept |= kept
        weighted_sum += delta.masked_fill_(~kept, 0) * weight
        del delta, magnitude, kept
    zero_sum = (weighted_sum == 0) & any_kept
    if cutoffs is not None:
        return tied & ~zero_sum, zero_sum
    return tied, zero_sum & ~tied


def compare(left: CheckpointReader, right: CheckpointReader, *, inputs: list[CheckpointReader] | None,
            density: float | None, weights: list[float] | None,
            cutoffs: list[float] | None = None) -> tuple[dict[str, KindStats], list[str], list[dict]]:
    problems = []
    left_names, right_names = left.names(), right.names()
    for name in sorted(left_names - right_names):
        problems.append(f"only in {left.folder}: {name}")
    for name in sorted(right_names - left_names):
        problems.append(f"only in {right.folder}: {name}")

    kinds: dict[str, KindStats] = {}
    other_tensors = []
    for name in sorted(left_names & right_names):
        a, b = left.get(name), right.get(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        stats = kinds.setdefault(LAYER_INDEX.sub(".N.", name), KindStats(LAYER_INDEX.sub(".N.", name)))
        stats.tensors += 1
        stats.elements += a.numel()
        stats.max_abs_value = max(stats.max_abs_value, a.float().abs().max().item())
        differ = a != b
        n_differ = int(differ.sum())
        if n_differ == 0:
            continue

        stats.differing += n_differ
        stats.max_abs_diff = max(stats.max_abs_diff, (a.float() - b.float()).abs().max().item())
        ulps = ulp_distance(a, b) if a.dtype in ULP_DTYPES else None
        if ulps is not None:
            stats.max_ulp_diff = max(stats.max_ulp_diff, float(ulps.max()))

        if inputs is not None and density is not None and weights is not None:
            tied, zero_sum = classify_positions(inputs, name, weights, density=density, cutoffs=cutoffs)
            stats.differing_tied += int((differ & tied).sum())
            stats.differing_zero_sum += int((differ & zero_sum).sum())
            unexplained = differ & ~tied & ~zero_sum
            rounding = unexplained & (ulps <= 1) if ulps is not None else torch.zeros_like(unexplained)
            stats.differing_rounding += int(rounding.sum())
            other = unexplained & ~rounding
            n_other = int(other.sum())
            if n_other:
                max_other_ulp = float(ulps[other].max()) if ulps is not None else float("nan")
                stats.max_ulp_diff_other = max(stats.max_ulp_diff_other, max_other_ulp)
                other_tensors.append({"tensor": name, "differing_other": n_other, "max_ulp": max_other_ulp})
    return kinds, problems, other_tensors


def format_table(kinds: dict[str, KindStats], *, explained: bool) -> str:
    header = "| tensor kind | tensors | differing elements | max abs diff | max ulp diff |"
    rule = "|---|---:|---:|---:|---:|"
    if explained:
        header += " of the differing: at a tie | at a zero sum | rounding (1 ulp) | other | max ulp diff, other |"
        rule += "---:|---:|---:|---:|---:|"
    total = KindStats("all")
    rows = []
    for stats in sorted(kinds.values(), key=lambda item: item.kind):
        rows.append(stats)
        total.tensors += stats.tensors
        total.elements += stats.elements
        total.differing += stats.differing
        total.differing_tied += stats.differing_tied
        total.differing_zero_sum += stats.differing_zero_sum
        total.differing_rounding += stats.differing_rounding
        total.max_abs_diff = max(total.max_abs_diff, stats.max_abs_diff)
        total.max_ulp_diff = max(total.max_ulp_diff, stats.max_ulp_diff)
        total.max_ulp_diff_other = max(total.max_ulp_diff_other, stats.max_ulp_diff_other)
    rows.append(total)

    lines = [header, rule]
    for stats in rows:
        kind = "all" if stats is total else f"`{stats.kind}`"
        row = (
            f"| {kind} | {stats.tensors} | {stats.differing / max(stats.elements, 1):.4%} "
            f"| {stats.max_abs_diff:.3g} | {stats.max_ulp_diff:.3g} |"
        )
        if explained:
            differing = max(stats.differing, 1)
            other = stats.differing - stats.differing_tied - stats.differing_zero_sum - stats.differing_rounding
            row += (
                f" {stats.differing_tied / differing:.2%} | {stats.differing_zero_sum / differing:.2%} "
                f"| {stats.differing_rounding / differing:.2%} | {other / differing:.2%} "
                f"| {stats.max_ulp_diff_other:.3g} |"
            )
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("left", type=Path, help="first merged checkpoint folder (e.g. mergekit's output)")
    parser.add_argument("right", type=Path, help="second merged checkpoint folder (e.g. ours)")
    parser.add_argument("--inputs", type=Path, nargs="+",
                        help="base folder, then the merged models' folders, to classify the differences")
    parser.add_argument("--density", type=float, help="the TIES density of every model, needed with --inputs")
    parser.add_argument("--weights", type=float, nargs="+",
                        help="the TIES weight of each merged model, in --inputs order (default 1 each)")
    parser.add_argument("--scope", choices=("tensor", "model"), default="tensor",
                        help="where the TIES trim of the compared merges ranks entries: per tensor, as mergekit "
                             "(default), or over the whole model, as scope: model and FusionBench")
    parser.add_argument("--json", type=Path, help="also write the statistics to this JSON file")
    args = parser.parse_args()
    if (args.inputs is None) != (args.density is None):
        parser.error("--inputs and --density go together")
    weights = None
    if args.inputs:
        weights = args.weights or [1.0] * (len(args.inputs) - 1)
        if len(args.inputs) < 2 or len(weights) != len(args.inputs) - 1:
            parser.error("--inputs takes the base and then each merged model, with one --weights value per model")

    inputs = [CheckpointReader(path) for path in args.inputs] if args.inputs else None
    left, right = CheckpointReader(args.left), CheckpointReader(args.right)
    cutoffs, counting = None, None
    if inputs is not None and args.scope == "model":
        cutoffs, counting = model_cutoffs(inputs, sorted(left.names() & right.names()), args.density)
        print(f"whole-model trim: k = {counting['k']} of {counting['entries']} entries per model, cut-offs "
              + ", ".join(f"{cutoff:.6g}" for cutoff in cutoffs))
        if counting["k_double_product"] != counting["k"]:
            print(f"note: the double product int(d * density) gives k = {counting['k_double_product']}, "
                  f"so implementations that count k that way cut at another entry")
    kinds, problems, other = compare(left, right, inputs=inputs, density=args.density, weights=weights,
                                     cutoffs=cutoffs)
    print(format_table(kinds, explained=inputs is not None))
    for problem in problems:
        print(f"mismatch: {problem}")
    for entry in other[:20]:
        print(f"differs at neither a tie nor a zero sum: {entry['tensor']}: {entry['differing_other']} elements, "
              f"max {entry['max_ulp']:.3g} ulp")
    if len(other) > 20:
        print(f"... and {len(other) - 20} more such tensors")
    if args.json:
        args.json.write_text(json.dumps({
            "scope": args.scope,
            "model_cutoffs": cutoffs,
            "model_trim_counting": counting,
            "kinds": [asdict(stats) for stats in kinds.values()],
            "problems": problems,
            "other": other,
        }, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
