"""Shared fixtures. Tests run offline: the hub is skipped (SPQR_OFFLINE=1) unless a test says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SPQR_OFFLINE", "1")
    monkeypatch.delenv("SPQR_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    from spqr_cli.demo import DEMO_MODEL

    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_path):
    from spqr_cli.models import load_tokenizer

    return load_tokenizer(str(demo_model_path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small corpus file: 200 numbered rows."""
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"Row {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    return path
