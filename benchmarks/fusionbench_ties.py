"""Merge the benchmark checkpoints with FusionBench's TIES, which trims the whole model in memory.

This script runs in benchmarks/.venv-fusionbench, where benchmarks/run.sh installs the PyPI package
``fusion-bench``. It reads the same recipe as ``merge run`` (benchmarks/ties-model-scope.yml) and
runs the merge as a FusionBench user would:

1. ``CausalLMPool`` loads the base (``_pretrained_``) and each fine-tune with
   ``AutoModelForCausalLM.from_pretrained`` in the recipe's ``dtype``, all in memory
   (``enable_lazy_loading: false``).
2. ``TiesMergingAlgorithm.run`` flattens every state dict into one vector of d entries. It trims
   each task vector to the entries with |tau| at or above its (d - k)-th smallest magnitude, with
   k = int(threshold * d), so k + 1 entries and every tie with them survive. It elects the sign
   of the sum of the trimmed vectors. Where that sum is 0, the majority of the elected signs over
   the whole model decides. It then takes the disjoint mean (``merge_func: mean``) or sum, and
   adds ``scaling_factor`` times the result to the base.
3. ``CausalLMPool.save_model`` casts the model to the recipe's ``out_dtype`` and writes it with
   ``save_pretrained`` (safetensors), with the base's tokenizer.

The recipe settings map to FusionBench's as follows. A recipe that FusionBench cannot express,
such as per-model weights other than 1, per-tensor trimming or another sign election, is
rejected with every problem listed.

| recipe | FusionBench |
|---|---|
| ``density`` (one value for every model) | ``threshold`` (FusionBench reads a value above 1 as a percentage) |
| ``lambda`` (default 1.0) | ``scaling_factor`` |
| ``normalize: true`` (default) / ``false`` | ``merge_func: mean`` / ``sum`` |
| ``scope: model`` | the only trim FusionBench has |
| ``dtype`` / ``out_dtype`` | ``torch_dtype`` of the model pool / ``model_dtype`` of ``save_model`` |
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

LOG = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
GLOBAL_PARAMETERS = {"lambda", "normalize", "scope", "sign_election"}
MODEL_PARAMETERS = {"weight", "density"}
DTYPES = {"float32", "bfloat16", "float16"}


def fusionbench_settings(recipe: dict) -> dict:
    """Translate a mergekit_plus TIES recipe into FusionBench's model pool and TIES settings.

    Returns a dict with ``models`` (the model pool's name-to-path mapping, the base under
    ``_pretrained_``), ``torch_dtype``, ``model_dtype`` and ``algorithm`` (the keyword arguments of
    ``TiesMergingAlgorithm``). Raises ValueError listing every setting FusionBench cannot honour.
    """
    problems = []
    for key in sorted(set(recipe) - TOP_LEVEL_KEYS):
        problems.append(f"top-level key {key!r} has no FusionBench counterpart")
    if recipe.get("merge_method") != "ties":
        problems.append(f"merge_method must be 'ties', got {recipe.get('merge_method')!r}")
    if not isinstance(recipe.get("base_model"), str):
        problems.append("base_model must be a checkpoint path")

    parameters = recipe.get("parameters") or {}
    for key in sorted(set(parameters) - GLOBAL_PARAMETERS):
        problems.append(f"parameters.{key} has no FusionBench counterpart")
    if parameters.get("scope") != "model":
        problems.append(f"parameters.scope must be 'model', FusionBench's whole-model trim, "
                        f"got {parameters.get('scope')!r}")
    if parameters.get("sign_election", "trimmed") != "trimmed":
        problems.append(f"parameters.sign_election must be 'trimmed', FusionBench's sign of the trimmed sum, "
                        f"got {parameters['sign_election']!r}")
    normalize = parameters.get("normalize", True)
    if not isinstance(normalize, bool):
        problems.append(f"parameters.normalize must be true or false, got {normalize!r}")
    scaling_factor = parameters.get("lambda", 1.0)
    if not isinstance(scaling_factor, (int, float)) or isinstance(scaling_factor, bool):
        problems.append(f"parameters.lambda must be a number, got {scaling_factor!r}")

    models: dict[str, str] = {"_pretrained_": recipe.get("base_model")}
    densities = set()
    entries = recipe.get("models") or []
    if not entries:
        problems.append("models must list at least one fine-tune")
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        model_parameters = entry.get("parameters") or {}
        for key in sorted(set(model_parameters) - MODEL_PARAMETERS):
            problems.append(f"{where}.parameters.{key} has no FusionBench counterpart")
        if model_parameters.get("weight", 1.0) != 1.0:
            problems.append(f"{where}.parameters.weight must be 1.0 because FusionBench's TIES has no "
                            f"per-model weights, got {model_parameters['weight']!r}")
        density = model_parameters.get("density", 0.2)
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
            problems.append(f"{where}.parameters.density must be a number in (0, 1], got {density!r}")
        else:
            densities.add(float(density))
        # The pool needs a unique name per model, and FusionBench reserves names like _pretrained_.
        models[f"model_{index + 1}"] = entry.get("model")
    if len(densities) > 1:
        problems.append(f"every model needs the same density because FusionBench trims all task "
                        f"vectors at one threshold, got {sorted(densities)}")

    dtype = recipe.get("dtype", "float32")
    out_dtype = recipe.get("out_dtype", dtype)
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value not in DTYPES:
            problems.append(f"{key} must be one of {sorted(DTYPES)}, got {value!r}")

    if problems:
        raise ValueError("the recipe cannot be run by FusionBench's TIES:\n  " + "\n  ".join(problems))
    return {
        "models": models,
        "torch_dtype": dtype,
        "model_dtype": out_dtype,
        "algorithm": {
            "scaling_factor": float(scaling_factor),
            # A value of at most 1 is the kept fraction itself, so no percentage rounding enters.
            "threshold": densities.pop(),
            "remove_keys": [],
            "merge_func": "mean" if normalize else "sum",
        },
    }


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, help="mergekit_plus TIES recipe with scope: model; paths are relative "
                                                  "to the current folder")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the merged checkpoint to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import yaml

    try:
        settings = fusionbench_settings(yaml.safe_load(args.recipe.read_text()))
    except ValueError as error:
        print(f"error: {args.recipe}: {error}", file=sys.stderr)
        return 2
    if args.output.exists():
        print(f"error: output folder {args.output} already exists; remove it first", file=sys.stderr)
        return 2

    # Importing fusion_bench pulls in lightning, hydra and transformers, so the recipe is checked first.
    from fusion_bench.method import TiesMergingAlgorithm
    from fusion_bench.modelpool import CausalLMPool
    from transformers.utils import logging as transformers_logging

    # One progress bar per loaded model would fill the log that bench.py keeps.
    transformers_logging.disable_progress_bar()

    LOG.info("FusionBench TIES settings: %s", settings)
    start = time.perf_counter()
    pool = CausalLMPool(
        models=settings["models"],
        tokenizer=settings["models"]["_pretrained_"],
        model_kwargs={"torch_dtype": settings["torch_dtype"]},
        enable_lazy_loading=False,
    )
    algorithm = TiesMergingAlgorithm(**settings["algorithm"])
    model = algorithm.run(pool)
    merged = time.perf_counter()
    LOG.info("loaded and merged in %.1f s, peak RSS so far %.2f GB", merged - start, peak_rss_gb())

    pool.save_model(model, str(args.output), model_dtype=settings["model_dtype"], save_tokenizer=True)
    LOG.info("saved %s in %.1f s, peak RSS %.2f GB", args.output, time.perf_counter() - merged, peak_rss_gb())
    return 0


if __name__ == "__main__":
    sys.exit(main())
