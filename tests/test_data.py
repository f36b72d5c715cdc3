from __future__ import annotations

import sys

import pytest
import torch

from spqr_cli.core import data
from spqr_cli.core.errors import SpQRError


def test_split_windows_counts_and_boundaries():
    ids = torch.arange(10_050)
    w = data.split_windows(ids, 1000)
    assert w.shape == (10, 1000)  # the 50-token tail is dropped
    assert torch.equal(w[0], torch.arange(0, 1000))
    assert torch.equal(w[3], torch.arange(3000, 4000))  # non-overlapping, contiguous
    assert int(w[-1, -1]) == 9999
    assert data.split_windows(ids, 1000, max_windows=4).shape == (4, 1000)
    assert data.split_windows(ids, 1000, max_windows=99).shape == (10, 1000)
    assert data.split_windows(torch.arange(1000), 1000).shape == (1, 1000)
    with pytest.raises(SpQRError, match="fewer than one window"):
        data.split_windows(torch.arange(999), 1000)


def test_rows_joined_with_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first row\n\n  \nsecond row\nthird\n")
    text, source = data.load_text(f"file:{path}")
    assert text == "first row\n\nsecond row\n\nthird"
    assert source == str(path)


def test_test_windows_match_single_tokenization(text_file, demo_tokenizer):
    windows, _ = data.test_windows(demo_tokenizer, f"file:{text_file}", seqlen=64)
    text, _ = data.load_text(f"file:{text_file}")
    ids = data.tokenize(demo_tokenizer, text)
    assert windows.shape == (ids.numel() // 64, 64)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])


def test_local_data_dir_and_env(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = Title = \n body text\n")
    text, source = data.load_text("wikitext2", data_dir=tmp_path)
    assert text == " = Title = \n\n body text"
    assert source.endswith("wiki.test.raw")
    monkeypatch.setenv("SPQR_DATA_DIR", str(tmp_path))
    assert data.load_text("wikitext2")[0] == text


def test_shared_wikitext_copy(shared_data):
    rows, _ = data.load_rows("wikitext2", data_dir=shared_data)
    assert len(rows) == 2891 and rows[0] == " = Robert Boulter = "


def test_offline_error_lists_where_it_looked(tmp_path):
    with pytest.raises(SpQRError) as exc:
        data.load_text("wikitext2", data_dir=tmp_path)
    msg = str(exc.value)
    assert "SPQR_OFFLINE" in msg
    assert str(tmp_path / "wikitext2" / "wiki.test.raw") in msg
    assert "--data-dir" in msg and "SPQR_DATA_DIR" in msg and "\n" not in msg


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("SPQR_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(SpQRError, match="hub not reachable.*no data directory given"):
        data.load_text("ptb", split="calib")


def test_missing_datasets_library(monkeypatch):
    monkeypatch.delenv("SPQR_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SpQRError, match="`datasets` library is not installed"):
        data.load_text("c4")


def test_bad_dataset_names(tmp_path):
    with pytest.raises(SpQRError, match="unknown dataset 'wiki'.*file:PATH"):
        data.load_text("wiki")
    with pytest.raises(SpQRError, match="not found"):
        data.load_text(f"file:{tmp_path / 'nope.txt'}")
    with pytest.raises(SpQRError, match="no test split"):
        data.load_text("redpajama", "test")


def test_sample_windows_seeded_and_bounded():
    ids = torch.arange(5000)
    a = data.sample_windows(ids, 8, 100, seed=1)
    assert a.shape == (8, 100)
    assert torch.equal(a, data.sample_windows(ids, 8, 100, seed=1))
    assert not torch.equal(a, data.sample_windows(ids, 8, 100, seed=2))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 99, dtype=torch.int64))  # contiguous windows
    with pytest.raises(SpQRError, match="more than the calibration text holds"):
        data.sample_windows(ids, 51, 100, seed=0)


def test_settle_hub_mode(monkeypatch, tmp_path):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SPQR_OFFLINE")
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=2.0: False)
    data.settle_hub_mode(str(tmp_path))  # a local path: nothing to decide
    assert "HF_HUB_OFFLINE" not in os.environ
    data.settle_hub_mode("org/some-model")  # a hub id with no network: cache-only, no 30 s of retries
    assert os.environ["HF_HUB_OFFLINE"] == "1"
