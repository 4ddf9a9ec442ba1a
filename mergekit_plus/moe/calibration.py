"""Routing statistics of an MoE checkpoint from one forward pass over calibration text.

The model is loaded whole with transformers, in float32 on the chosen device, and every router
gets a forward hook. transformers 5 keeps each layer's experts fused in one module, so the router
(`….gate`) is the one module whose output shows per-expert decisions. Its output, or the first entry
of a tuple output, is the router-logit matrix (tokens × E).
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_plus.errors import InputError
from mergekit_plus.learn.data import read_texts

logger = logging.getLogger(__name__)

_ROUTER_MODULE = re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate$")
_EXPERTS_MODULE = re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts$")
_TEXT_FIELDS = ("text", "prompt", "input", "content")


@dataclass(frozen=True)
class LayerRouting:
    """Routing statistics of one MoE layer over the calibration tokens."""

    usage: torch.Tensor
    """f_e: the share of top-k picks that went to each expert (E,), summing to 1."""
    logit_gram: torch.Tensor
    """LᵀL (E × E) of the router-logit matrix L, from which cosine similarities follow."""
    tokens: int
    output_similarity: torch.Tensor | None = None
    """Sim(i, j) (E × E): the mean over tokens of the cosine between expert i's and expert j's outputs,
    every expert run on every token that reached the layer. Gathered only on request."""


def calibration_problems(pattern: str) -> list[str]:
    """Return why `pattern` names no readable calibration file, for checks before any model is loaded."""
    paths = sorted(Path(match) for match in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        return [f"no calibration file matches `{pattern}`; set `calibration:` to a .jsonl or .txt file or a glob "
                "pattern that matches some"]
    return [f"calibration file {path} not found; set `calibration:` to a .jsonl or .txt file, such as "
            "build/zoo/test/lm/data/vowels/calibration.jsonl" for path in paths if not path.is_file()]


def read_calibration_texts(pattern: str, *, limit: int) -> list[str]:
    """Read up to `limit` texts from each file that `pattern` (a path or a glob pattern) matches, in name order.

    A .jsonl file contains one JSON object per line (`text`, `prompt`, `input` or `content`).
    Any other file contains one text per line.
    """
    paths = sorted(Path(match) for match in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        raise InputError(f"no calibration file matches {pattern}",
                         hint="set `calibration:` to a .jsonl or .txt file or a glob pattern that matches some")
    texts = []
    for path in paths:
        texts += _read_texts(path, limit=limit)
    return texts


def _read_texts(path: Path, *, limit: int) -> list[str]:
    if not path.is_file():
        raise InputError(f"calibration file {path} not found",
                         hint="set `calibration:` to a .jsonl or .txt file, such as build/zoo/test/lm/data/vowels/"
                              "calibration.jsonl")
    # The recipe's `data:` files are read by the same reader, so both accept the same rows.
    try:
        texts = read_texts(path, fields=_TEXT_FIELDS, limit=limit)
    except ValueError as exc:
        raise InputError(str(exc), hint='write one JSON object per line, such as {"text": "..."}, or use a .txt '
                                        "file with one text per line") from exc
    if not texts:
        raise InputError(f"calibration file {path} contains no text", hint="add at least one line of text")
    return texts


def gather_routing(model_folder: Path, texts: list[str], *, top_k: int, max_tokens: int,
                   device: torch.device, expert_outputs: bool = False) -> dict[int, LayerRouting]:
    """Run the model over `texts`, one text at a time, and return each MoE layer's routing statistics.

    With `expert_outputs`, every expert also runs on every token that reaches its layer, and each
    layer's `output_similarity` is filled in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # The run's own log covers loading; transformers' progress bar would ignore --quiet.
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).to(device).eval()
    counts: dict[int, torch.Tensor] = {}
    grams: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    cosine_sums: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module, inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.reshape(-1, logits.shape[-1]).double()
            picks = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices.reshape(-1)
            counts[layer] = counts.get(layer, 0) + torch.bincount(picks, minlength=logits.shape[-1]).cpu()
            grams[layer] = grams.get(layer, 0) + (logits.T @ logits).cpu()
            tokens[layer] = tokens.get(layer, 0) + logits.shape[0]
        return hook

    handles = []
    for name, module in model.named_modules():
        match = _ROUTER_MODULE.search(name)
        if match:
            handles.append(module.register_forward_hook(record(int(match.group(1)))))
    if expert_outputs:
        handles += _hook_expert_outputs(model, cosine_sums, model_folder)
    if not handles:
        raise InputError(f"no router modules (`layers.N.block_sparse_moe.gate` or `layers.N.mlp.gate`) found in "
                         f"{model_folder}", hint="expert merging needs a Mixtral, Qwen2-MoE or OLMoE style model")
    try:
        with torch.no_grad():
            for text in texts:
                encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
                model(**{key: value.to(device) for key, value in encoded.items()})
    finally:
        for handle in handles:
            handle.remove()
    # Softmax is monotonic, so top-k of the logits picks what top-k of the probabilities picks.
    return {layer: LayerRouting(counts[layer].double() / counts[layer].sum(), grams[layer], tokens[layer],
                                (cosine_sums[layer] / tokens[layer]) if layer in cosine_sums else None)
            for layer in sorted(counts)}


def _hook_expert_outputs(model, cosine_sums: dict[int, torch.Tensor], model_folder: Path) -> list:
    """Hook each fused experts module to run all of its experts on its input and sum output cosines."""
    from mergekit_plus.moe.subspace import output_cosine_sum

    def record(layer: int):
        def hook(module, args):
            hidden = args[0].reshape(-1, args[0].shape[-1])
            gate, up = torch.einsum("td,efd->etf", hidden, module.gate_up_proj).chunk(2, dim=-1)
            outputs = torch.einsum("etf,edf->etd", module.act_fn(gate) * up, module.down_proj)
            cosine_sums[layer] = cosine_sums.get(layer, 0) + output_cosine_sum(outputs).cpu()
        return hook

    handles = []
    for name, module in model.named_modules():
        match = _EXPERTS_MODULE.search(name)
        if not match:
            continue
        if not all(hasattr(module, attribute) for attribute in ("gate_up_proj", "down_proj", "act_fn")):
            raise InputError(f"{model_folder}: the experts module {name} has no fused gate_up_proj, down_proj "
                             "and act_fn, so its experts' outputs cannot be computed",
                             hint="load the model with transformers 5, which fuses the experts of Mixtral, "
                                  "Qwen2-MoE and OLMoE")
        handles.append(module.register_forward_pre_hook(record(int(match.group(1)))))
    if not handles:
        raise InputError(f"no experts modules (`layers.N.block_sparse_moe.experts` or `layers.N.mlp.experts`) "
                         f"found in {model_folder}",
                         hint="expert merging needs a Mixtral, Qwen2-MoE or OLMoE style model")
    return handles
