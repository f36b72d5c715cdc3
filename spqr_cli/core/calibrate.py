"""Calibration sets: random token windows with a manifest, stored as safetensors.

File layout: one tensor ``input_ids`` [nsamples, seqlen] int64; the safetensors metadata holds the manifest
(all values strings): ``format``, ``spqr_version``, ``model``, ``tokenizer``, ``tokenizer_sha256`` (a hash of
the vocabulary, so a file made with another tokenizer is detected), ``dataset``, ``source``, ``split``,
``nsamples``, ``seqlen``, ``seed`` and ``sha256`` (of the ids' little-endian int64 bytes).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spqr_cli import __version__
from spqr_cli.core.data import ids_sha256, load_text, sample_windows, tokenize, tokenizer_fingerprint
from spqr_cli.core.errors import SpQRError

FORMAT = "spqr-calibration/1"
_INT_KEYS = ("nsamples", "seqlen", "seed")


@dataclass
class CalibrationSet:
    """Calibration windows and the manifest that says how they were made."""

    input_ids: torch.Tensor
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def build_calibration_set(tokenizer: Any, dataset: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                          data_dir: str | os.PathLike | None = None, model: str | None = None) -> CalibrationSet:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from ``dataset``'s calibration split."""
    text, source = load_text(dataset, "calib", data_dir)
    ids = sample_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)
    manifest = {
        "format": FORMAT,
        "spqr_version": __version__,
        "model": model or getattr(tokenizer, "name_or_path", "") or "",
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "dataset": dataset,
        "source": source,
        "split": "calib",
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "sha256": ids_sha256(ids),
    }
    return CalibrationSet(ids, manifest)


def save_calibration(calib: CalibrationSet, path: str | os.PathLike) -> Path:
    """Write ``calib`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise SpQRError(f"--out {path} is a directory; give a file path such as {path / 'calib.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in calib.manifest.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"input_ids": calib.input_ids.to(torch.int64).contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_calibration(path: str | os.PathLike, tokenizer: Any | None = None) -> CalibrationSet:
    """Read a calibration file, verify its checksum and, given a tokenizer, that it was made with the same one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SpQRError(f"calibration file {str(path)!r} not found; make one with `spqr calibrate`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if "input_ids" not in f.keys():
                raise SpQRError(f"{path} has no 'input_ids' tensor; is it a `spqr calibrate` file?")
            ids = f.get_tensor("input_ids")
    except (SafetensorError, OSError) as e:
        raise SpQRError(f"{path} is not a readable safetensors calibration file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise SpQRError(f"{path} is not a `spqr calibrate` file (format {metadata.get('format')!r}, "
                        f"expected {FORMAT!r})")
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SpQRError(f"{path}: input_ids must be a 2-D int64 tensor, found {ids.dtype} {tuple(ids.shape)}")
    if ids_sha256(ids) != metadata.get("sha256"):
        raise SpQRError(f"{path} is corrupt: the token ids do not match the sha256 in its manifest")
    manifest: dict[str, Any] = dict(metadata)
    for key in _INT_KEYS:
        if key in manifest:
            try:
                manifest[key] = int(manifest[key])
            except ValueError:
                raise SpQRError(f"{path} has a damaged manifest ({key} = {manifest[key]!r} is not an integer); "
                                "rebuild it with `spqr calibrate`") from None
    if tokenizer is not None:
        expected = tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_sha256") != expected:
            raise SpQRError(f"{path} was made with another tokenizer ({manifest.get('tokenizer')!r}); "
                            "run `spqr calibrate` again with this model")
    return CalibrationSet(ids, manifest)
