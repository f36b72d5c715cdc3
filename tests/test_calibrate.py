from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from spqr_cli.core.calibrate import build_calibration_set, load_calibration, save_calibration
from spqr_cli.core.errors import SpQRError
from spqr_cli.demo import DEMO_CALIB

DATASET = f"file:{DEMO_CALIB}"


def test_same_seed_same_set_different_seed_different(demo_tokenizer):
    a = build_calibration_set(demo_tokenizer, DATASET, nsamples=16, seqlen=64, seed=3)
    b = build_calibration_set(demo_tokenizer, DATASET, nsamples=16, seqlen=64, seed=3)
    c = build_calibration_set(demo_tokenizer, DATASET, nsamples=16, seqlen=64, seed=4)
    assert a.input_ids.shape == (16, 64) and a.input_ids.dtype == torch.int64
    assert a.sha256 == b.sha256 and torch.equal(a.input_ids, b.input_ids)
    assert c.sha256 != a.sha256


def test_roundtrip_and_manifest(tmp_path, demo_tokenizer):
    calib = build_calibration_set(demo_tokenizer, DATASET, nsamples=4, seqlen=32, seed=0, model="demo")
    path = save_calibration(calib, tmp_path / "sub" / "calib.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["calib.safetensors"]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for key in ("model", "tokenizer", "tokenizer_sha256", "dataset", "nsamples", "seqlen", "seed", "sha256"):
        assert key in meta
    loaded = load_calibration(path, tokenizer=demo_tokenizer)
    assert torch.equal(loaded.input_ids, calib.input_ids)
    assert loaded.manifest["nsamples"] == 4 and loaded.manifest["seed"] == 0
    assert loaded.manifest["model"] == "demo"


def test_other_tokenizer_and_corruption_detected(tmp_path, demo_tokenizer):
    calib = build_calibration_set(demo_tokenizer, DATASET, nsamples=2, seqlen=16, seed=0)
    calib.manifest["tokenizer_sha256"] = "0" * 64
    path = save_calibration(calib, tmp_path / "c.safetensors")
    load_calibration(path)  # fine without a tokenizer to compare against
    with pytest.raises(SpQRError, match="another tokenizer"):
        load_calibration(path, tokenizer=demo_tokenizer)
    calib.manifest["sha256"] = "f" * 64
    save_calibration(calib, path)
    with pytest.raises(SpQRError, match="corrupt"):
        load_calibration(path)
    with pytest.raises(SpQRError, match="not found"):
        load_calibration(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpQRError, match="not a readable"):
        load_calibration(tmp_path / "junk.safetensors")


def test_too_many_tokens_requested(demo_tokenizer):
    with pytest.raises(SpQRError, match="more than the calibration text holds"):
        build_calibration_set(demo_tokenizer, DATASET, nsamples=1000, seqlen=512, seed=0)
