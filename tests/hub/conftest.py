"""Fixtures of the upload tests: the Hub stand-in on 127.0.0.1, and merged folders to upload.

The root conftest keeps huggingface_hub offline and points it at a temporary HF_HOME. The
`hub_standin` fixture turns offline mode off for one test and points the client at the stand-in
instead of https://huggingface.co. It sets `huggingface_hub.constants.ENDPOINT`, which the client
reads once at import and uses for calls without an endpoint, such as the input lookups of
`snapshot_download`. It also sets HF_ENDPOINT for subprocesses. Every request of a test therefore
goes to 127.0.0.1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The end-to-end helpers (write_recipe, invoke, read_card) live beside the e2e tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from hub_standin import HubStandIn  # noqa: E402
from upload_helpers import HUB_TOKEN, ties_recipe  # noqa: E402


@pytest.fixture
def hub_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """A running stand-in that accepts `HUB_TOKEN`, with HF_TOKEN set to it and offline mode off."""
    from huggingface_hub import constants

    standin = HubStandIn(token=HUB_TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", standin.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    yield standin
    standin.stop()


@pytest.fixture(scope="session")
def merged_folder(tmp_path_factory: pytest.TempPathFactory, llama_base: Path, llama_fine_tunes: tuple[Path, Path]) -> Path:
    """A TIES merge of the local fixtures in shards of at most 20 KB, written once. Tests copy it to change it."""
    from merge_helpers import invoke, write_recipe

    folder = tmp_path_factory.mktemp("merged-once")
    recipe = write_recipe(folder, ties_recipe(llama_base, llama_fine_tunes, folder / "merged"))
    invoke(["run", recipe, "--quiet"], expected_exit=0)
    return folder / "merged"

