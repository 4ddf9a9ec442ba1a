"""Build the zoo at a named size, cached on disk by a hash of its settings.

A zoo folder contains `zoo.json` (the manifest: settings, their hash, each family's checkpoints, data
and accuracies) and one folder per family. A build writes into a staging folder beside the target
and renames it into place, so an interrupted build leaves no half-written zoo behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_plus.errors import InputError, OutputError
from mergekit_plus.io.writer import StagedOutput
from mergekit_plus.zoo.lm import LMSettings

logger = logging.getLogger(__name__)

MANIFEST = "zoo.json"
# Bump when the layout or the training code changes in a way that makes old zoos stale.
ZOO_FORMAT = 1
DEFAULT_ROOT = Path("build/zoo")

# Left out: a model of the bench size learned neither `add` nor `subtract` in 600 steps, and its
# `count_letter` fine-tune reached 67 % (the fine-tunes of the tasks kept reach 91 % or more).
_LM_TASKS = ("first_last", "next_letters", "sort", "middle", "vowels", "last_two", "char_at")

LM_SIZES: dict[str, LMSettings] = {
    "test": LMSettings(
        # The tasks that a model of this size learns in a few hundred steps.
        tasks=("first_last", "next_letters", "last_two", "vowels"),
        hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=256,
        base_steps=300, base_lr=3e-3, pretraining_rate=1.0, alignment_steps=10, alignment_lr=1e-4,
        fine_tune_steps=60, fine_tune_lr=1e-3, batch_size=32,
        eval_examples=100, calibration_examples=32, train_examples=64,
        lora_task="last_two", lora_rank=4, lora_steps=40, lora_lr=1e-2, lora_save_every=10,
        moe_experts=8, moe_top_k=2, moe_intermediate_size=64, moe_steps=100, seed=0,
    ),
    "bench": LMSettings(
        tasks=_LM_TASKS,
        hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=512,
        base_steps=600, base_lr=2e-3, pretraining_rate=1.0, alignment_steps=10, alignment_lr=1e-4,
        fine_tune_steps=150, fine_tune_lr=3e-4, batch_size=64,
        eval_examples=200, calibration_examples=64, train_examples=100,
        # A slow LoRA run: its accuracy on `sort` still rises at the last of its 10 checkpoints and the
        # first ones score near 0, so the checkpoint weightings of `mwa` give different scores.
        lora_task="sort", lora_rank=8, lora_steps=300, lora_lr=2e-4, lora_save_every=30,
        moe_experts=8, moe_top_k=2, moe_intermediate_size=256, moe_steps=600, seed=0,
    ),
}
SIZES = tuple(LM_SIZES)


@dataclass(frozen=True)
class ZooSettings:
    """Everything that decides a zoo's files; its hash names the cache entry."""

    size: str
    lm: LMSettings
    encoder: object | None
    threads: int

    def to_dict(self) -> dict:
        import peft
        import transformers

        return {
            "format": ZOO_FORMAT,
            "size": self.size,
            "lm": self.lm.to_dict(),
            "encoder": self.encoder.to_dict() if self.encoder is not None else None,
            "threads": self.threads,
            # Training results depend on these versions, so a new one rebuilds the zoo.
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
        }

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings_for(size: str, *, threads: int | None = None) -> ZooSettings:
    """Return the settings of a named size; the encoder family is part of the bench size only."""
    if size not in LM_SIZES:
        raise InputError(f"unknown zoo size {size!r}", hint=f"choose one of: {', '.join(SIZES)}")
    encoder = None
    if size == "bench":
        from mergekit_plus.zoo.encoder import BENCH_SETTINGS

        encoder = BENCH_SETTINGS
    return ZooSettings(size=size, lm=LM_SIZES[size], encoder=encoder, threads=threads or default_threads())


def default_threads() -> int:
    # Results depend on the thread count, so it is fixed rather than taken from the machine. One thread
    # never oversubscribes a busy machine: on a shared 2-core machine, two threads trained several times slower.
    return 1


def build_zoo(settings: ZooSettings, out: Path | None = None, *, force: bool = False,
              log: Callable[[str], None] = logger.info) -> tuple[Path, dict, bool]:
    """Build the zoo into `out` unless a zoo with the same settings is there; return (folder, manifest, built)."""
    out = Path(out) if out is not None else DEFAULT_ROOT / settings.size
    digest = settings.digest()

    # 1. Reuse a zoo built with the same settings.
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("settings_hash") == digest:
            log(f"zoo at {out} is up to date (settings {digest})")
            return out, manifest, False
    if out.exists() and not manifest_path.is_file():
        raise OutputError(f"{out} exists and is not a zoo folder (no {MANIFEST})",
                          hint="choose another --out or remove that folder")

    # 2. Build into a staging folder beside the target. The merge's staged output also removes the
    #    staging folders that killed builds left.
    staged = StagedOutput(out, overwrite=True)
    staged.check()
    staging = staged.begin()
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        families = {"lm": _build_lm(staging, settings, log)}
        if settings.encoder is not None:
            from mergekit_plus.zoo.encoder import build_encoder_family

            families["encoder"] = build_encoder_family(staging / "encoder", settings.encoder, log)
        manifest = {"format": ZOO_FORMAT, "size": settings.size, "settings_hash": digest,
                    "settings": settings.to_dict(), "families": families}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        staged.abort()
        raise
    finally:
        torch.set_num_threads(previous_threads)

    # 3. Swap the new zoo into place.
    staged.commit()
    log(f"built the {settings.size} zoo at {out} in {time.perf_counter() - started:.0f} s (settings {digest})")
    return out, manifest, True


def _build_lm(staging: Path, settings: ZooSettings, log: Callable[[str], None]) -> dict:
    from mergekit_plus.zoo.lm import build_lm_family

    return build_lm_family(staging / "lm", settings.lm, log)


def load_manifest(zoo: Path) -> dict:
    """Read a zoo's manifest. Raise InputError, with the command that builds one, when there is none."""
    path = Path(zoo) / MANIFEST
    if not path.is_file():
        if (Path(zoo).parent / MANIFEST).is_file():
            raise InputError(f"no zoo at {zoo} ({MANIFEST} not found)",
                             hint=f"pass the zoo folder itself: --zoo {Path(zoo).parent}")
        raise InputError(f"no zoo at {zoo} ({MANIFEST} not found)",
                         hint=f"build one with `merge zoo build --out {zoo}` or pass --zoo DIR")
    return json.loads(path.read_text(encoding="utf-8"))
