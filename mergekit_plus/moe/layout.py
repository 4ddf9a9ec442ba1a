"""Where a mixture-of-experts checkpoint stores its experts and routers, read from tensor names alone.

Two stored layouts are recognised, each in a per-expert and a fused form:

- Mixtral: `…layers.L.block_sparse_moe.experts.E.{w1,w3}.weight` (input projections, d_ff × d_model) and
  `…w2.weight` (output projection, d_model × d_ff), router `…block_sparse_moe.gate.weight` (E × d_model).
  transformers 5.25 writes this per-expert form on `save_pretrained`, although it keeps the experts fused
  in memory.
- Qwen2-MoE / OLMoE: `…layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`, router `…mlp.gate.weight`.
- Fused: `…experts.gate_up_proj` (E × 2·d_ff × d_model, gate rows first) and `…experts.down_proj`
  (E × d_model × d_ff) under either block name.

Shared experts (`shared_expert.*`, `shared_expert_gate.*`) and every other tensor are left alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Input projections (rows are intermediate neurons) and the output projection (columns are them).
_PER_EXPERT_ROLES = {
    "block_sparse_moe": (("w1", "w3"), "w2"),
    "mlp": (("gate_proj", "up_proj"), "down_proj"),
}
_PER_EXPERT = re.compile(r"^(?P<block>.*layers\.(?P<layer>\d+)\.(?P<kind>block_sparse_moe|mlp))\.experts\."
                         r"(?P<expert>\d+)\.(?P<role>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<block>.*layers\.(?P<layer>\d+)\.(?P<kind>block_sparse_moe|mlp))\.experts\."
                    r"(?P<role>gate_up_proj|down_proj)$")

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
"""Config keys that hold the number of routed experts per layer (Mixtral, Qwen2-MoE / OLMoE)."""


@dataclass(frozen=True)
class ExpertLayer:
    """The experts and the router of one MoE block, as stored."""

    layer: int
    block: str
    """The block's name prefix, such as `model.layers.0.block_sparse_moe`."""
    num_experts: int
    fused: bool
    input_roles: tuple[str, ...]
    """Names of the input projections (`w1`, `w3`), or (`gate_up_proj`,) when fused."""
    output_role: str

    @property
    def router_prefix(self) -> str:
        return f"{self.block}.gate."

    def expert_tensor(self, expert: int, role: str) -> str:
        """Return the stored name of one expert's projection in the per-expert layout."""
        return f"{self.block}.experts.{expert}.{role}.weight"

    def fused_tensor(self, role: str) -> str:
        return f"{self.block}.experts.{role}"

    def expert_tensors(self) -> list[str]:
        """Return the names of every stored expert tensor of this block."""
        roles = (*self.input_roles, self.output_role)
        if self.fused:
            return [self.fused_tensor(role) for role in roles]
        return [self.expert_tensor(expert, role) for expert in range(self.num_experts) for role in roles]

    def router_tensors(self, names: Iterable[str]) -> list[str]:
        """Return the router's tensors (weight, and bias where stored) among `names`."""
        return sorted(name for name in names if name.startswith(self.router_prefix))


def find_expert_layers(shapes: Mapping[str, tuple[int, ...]]) -> list[ExpertLayer]:
    """Find every MoE block in a checkpoint's tensor names and shapes. Raise ValueError for a partial one."""
    experts: dict[str, set[int]] = defaultdict(set)
    roles: dict[str, set[str]] = defaultdict(set)
    fused: dict[str, set[str]] = defaultdict(set)
    found: dict[str, tuple[int, str]] = {}
    for name in shapes:
        match = _PER_EXPERT.match(name)
        if match:
            experts[match["block"]].add(int(match["expert"]))
            roles[match["block"]].add(match["role"])
            found[match["block"]] = (int(match["layer"]), match["kind"])
            continue
        match = _FUSED.match(name)
        if match:
            fused[match["block"]].add(match["role"])
            found[match["block"]] = (int(match["layer"]), match["kind"])

    layers = []
    for block, (layer, kind) in sorted(found.items(), key=lambda item: item[1][0]):
        if block in fused:
            if fused[block] != {"gate_up_proj", "down_proj"}:
                raise ValueError(f"{block}: a fused expert layout needs experts.gate_up_proj and experts.down_proj, "
                                 f"found {sorted(fused[block])}")
            count = shapes[f"{block}.experts.gate_up_proj"][0]
            layers.append(ExpertLayer(layer, block, count, True, ("gate_up_proj",), "down_proj"))
            continue
        input_roles, output_role = _PER_EXPERT_ROLES[kind]
        expected = {*input_roles, output_role}
        if roles[block] != expected:
            raise ValueError(f"{block}: expected expert projections {sorted(expected)}, found {sorted(roles[block])}")
        count = max(experts[block]) + 1
        if experts[block] != set(range(count)):
            missing = sorted(set(range(count)) - experts[block])
            raise ValueError(f"{block}: experts {missing} are missing from the checkpoint")
        layers.append(ExpertLayer(layer, block, count, False, input_roles, output_role))
    return layers
