"""Shared fixtures: an offline Hugging Face home, and tiny checkpoints built once per session.

`huggingface_hub` reads `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` once, when it is first
imported, so `pytest_configure` sets them before any test module imports it. The autouse
fixture sets them again for every test, so a test that changes them cannot leak the change,
and subprocesses started by a test inherit them.

The checkpoint fixtures import the builders lazily, so unit tests that use none of them do
not pay for importing `transformers`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HUB_REPO_ID = "tiny-org/tiny-llama"

_hf_home: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hf_home
    _hf_home = Path(tempfile.mkdtemp(prefix="mergekit-plus-hf-home-"))
    os.environ["HF_HOME"] = str(_hf_home)
    os.environ["HF_HUB_CACHE"] = str(_hf_home / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("HF_TOKEN", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _hf_home is not None:
        shutil.rmtree(_hf_home, ignore_errors=True)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test offline, with the Hugging Face home in the session's temporary folder."""
    assert _hf_home is not None
    monkeypatch.setenv("HF_HOME", str(_hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(_hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        # Fails loudly if something imported huggingface_hub before pytest_configure ran.
        assert Path(constants.HF_HUB_CACHE) == _hf_home / "hub"
        assert constants.HF_HUB_OFFLINE
    return _hf_home


def _builders():
    import checkpoints

    return checkpoints


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


# Good checkpoints


@pytest.fixture(scope="session")
def llama_base(checkpoint_root: Path) -> Path:
    return _builders().build_llama_base(checkpoint_root / "llama-base")


@pytest.fixture(scope="session")
def llama_fine_tunes(checkpoint_root: Path) -> tuple[Path, Path]:
    """Two float32 fine-tunes of `llama_base` with different seeded deltas."""
    builders = _builders()
    return (
        builders.build_llama_fine_tune(checkpoint_root / "llama-fine-tune-1", seed=1),
        builders.build_llama_fine_tune(checkpoint_root / "llama-fine-tune-2", seed=2),
    )


@pytest.fixture(scope="session")
def llama_base_sharded(checkpoint_root: Path) -> Path:
    """`llama_base` saved in six shards of at most 20 KB with an index."""
    return _builders().build_llama_base(checkpoint_root / "llama-base-sharded", max_shard_size="20KB")


@pytest.fixture(scope="session")
def llama_base_bf16(checkpoint_root: Path) -> Path:
    import torch

    return _builders().build_llama_base(checkpoint_root / "llama-base-bf16", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_fine_tune_bf16(checkpoint_root: Path) -> Path:
    import torch

    return _builders().build_llama_fine_tune(checkpoint_root / "llama-fine-tune-bf16", seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_fine_tune_fp16(checkpoint_root: Path) -> Path:
    import torch

    return _builders().build_llama_fine_tune(checkpoint_root / "llama-fine-tune-fp16", seed=2, dtype=torch.float16)


@pytest.fixture(scope="session")
def qwen2_tied_base(checkpoint_root: Path) -> Path:
    return _builders().build_qwen2_tied(checkpoint_root / "qwen2-tied-base")


@pytest.fixture(scope="session")
def qwen2_tied_fine_tune(checkpoint_root: Path) -> Path:
    return _builders().build_qwen2_tied(checkpoint_root / "qwen2-tied-fine-tune", fine_tune_seed=1)


@pytest.fixture(scope="session")
def llama_fine_tune_pytorch_bin(checkpoint_root: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """The first fine-tune, stored as `pytorch_model.bin` instead of safetensors."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-fine-tune-bin")
    return builders.convert_to_pytorch_bin(folder)


@pytest.fixture(scope="session")
def hub_repo_id(llama_base: Path) -> str:
    """A Hub repo id whose snapshot of `llama_base` is in the offline cache."""
    assert _hf_home is not None
    _builders().install_in_hub_cache(llama_base, _hf_home / "hub", HUB_REPO_ID)
    return HUB_REPO_ID


# Checkpoints that a merge must reject or treat specially


@pytest.fixture(scope="session")
def llama_resized_vocab(checkpoint_root: Path) -> Path:
    """A fine-tune with two added tokens, so its embedding and head have 34 rows instead of 32."""
    return _builders().build_llama_resized_vocab(checkpoint_root / "llama-vocab-34", seed=3)


@pytest.fixture(scope="session")
def broken_sharded_checkpoints(checkpoint_root: Path, llama_base_sharded: Path) -> dict[str, tuple[Path, Path]]:
    """Copies of `llama_base_sharded` with one bad shard: cause -> (folder, bad shard file)."""
    builders = _builders()
    broken = {}
    for cause, damage in [
        ("missing", builders.remove_shard),
        ("lfs-pointer", builders.replace_shard_with_lfs_pointer),
        ("truncated", builders.truncate_shard),
    ]:
        folder = builders.copy_checkpoint(llama_base_sharded, checkpoint_root / f"llama-shard-{cause}")
        broken[cause] = (folder, damage(folder))
    return broken


@pytest.fixture(scope="session")
def transposed_probe_pair(checkpoint_root: Path, llama_base: Path, llama_fine_tunes: tuple[Path, Path]) -> tuple[Path, Path]:
    """A base and a fine-tune that both add `PROBE_TENSOR`, shaped (1, 8) in the base and (8, 1) in the fine-tune."""
    import torch

    builders = _builders()
    base = builders.copy_checkpoint(llama_base, checkpoint_root / "llama-probe-1x8")
    builders.add_tensor(base, builders.PROBE_TENSOR, torch.ones(1, 8))
    fine_tune = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-probe-8x1")
    builders.add_tensor(fine_tune, builders.PROBE_TENSOR, torch.ones(8, 1))
    return base, fine_tune


@pytest.fixture(scope="session")
def llama_quantization_config(checkpoint_root: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """A float32 fine-tune whose `config.json` declares 8-bit bitsandbytes quantization."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-quantization-config")
    return builders.add_quantization_config(folder)


@pytest.fixture(scope="session")
def llama_int8_weights(checkpoint_root: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """A fine-tune whose projection weights are int8, with no scales and no quantization key in `config.json`."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-int8-weights")
    return builders.quantize_projections_to_int8(folder, with_scales=False)


@pytest.fixture(scope="session")
def llama_int8_weights_with_scales(checkpoint_root: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """A fine-tune whose projection weights are int8 with float32 `*_proj.weight_scale` tensors beside them."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-int8-weights-with-scales")
    return builders.quantize_projections_to_int8(folder, with_scales=True)


@pytest.fixture(scope="session")
def llama_bf16_large_norm(checkpoint_root: Path, llama_base_bf16: Path) -> Path:
    """`llama_base_bf16` with 1e5 (stored as 99840 in bfloat16) at `EDITED_NORM`[3], past float16's 65504."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_base_bf16, checkpoint_root / "llama-bf16-large-norm")
    return builders.set_tensor_value(folder, builders.EDITED_NORM, (3,), 1e5)


@pytest.fixture(scope="session")
def llama_fine_tune_nan(checkpoint_root: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """A float32 fine-tune with a NaN at `EDITED_NORM`[3]."""
    builders = _builders()
    folder = builders.copy_checkpoint(llama_fine_tunes[0], checkpoint_root / "llama-fine-tune-nan")
    return builders.set_tensor_value(folder, builders.EDITED_NORM, (3,), float("nan"))


# The model zoo


@pytest.fixture(scope="session")
def test_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `test` size of the zoo, built once per session (under a minute on 2 cores)."""
    from mergekit_plus.zoo.build import build_zoo, settings_for

    folder, _, _ = build_zoo(settings_for("test"), tmp_path_factory.mktemp("zoo") / "test")
    return folder
