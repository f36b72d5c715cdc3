"""Text corpora, test windows and calibration sets.

Datasets: ``wikitext2``, ``ptb``, ``c4``, ``redpajama`` and ``file:PATH``. Each has two splits:

* ``test``  -- the text perplexity is measured on;
* ``calib`` -- the text calibration windows are drawn from (never evaluated on).

Where the text comes from, in order:

1. ``file:PATH`` reads that file (its non-empty lines are the rows) for both splits.
2. A data directory (``data_dir=`` / ``--data-dir`` or the ``SPQR_DATA_DIR`` environment variable) is read
   first when one is given and holds the split's file (names in ``LOCAL_FILES``; one row per line).
3. Otherwise the hub is tried through the optional ``datasets`` library -- only when the hub is reachable
   (a 2-second probe) or when ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` ask for the local cache;
   ``SPQR_OFFLINE=1`` skips the hub altogether. Nothing here waits on network timeouts.
4. Nothing found: a ``SpQRError`` that lists where it looked and how to provide the files.

Protocol (as in GPTQ/SpQR): rows are joined with ``"\\n\\n"`` and tokenized once; the test text is
cut into non-overlapping windows of ``seqlen`` tokens (the remainder at the end is dropped); calibration draws
``nsamples`` windows of ``seqlen`` tokens at random start positions from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError

SPLITS = ("test", "calib")
JOINER = "\n\n"

#: Local copies, relative to the data directory, per dataset and split (first existing file wins).
LOCAL_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "wikitext2": {"test": ("wikitext2/wiki.test.raw",), "calib": ("wikitext2/wiki.train.raw",)},
    # GPTQ/SpQR evaluate PTB on its validation split.
    "ptb": {"test": ("ptb/ptb.valid.txt",), "calib": ("ptb/ptb.train.txt",)},
    "c4": {"test": ("c4/c4-validation.txt",), "calib": ("c4/c4-train.txt",)},
    "redpajama": {"test": (), "calib": ("redpajama/redpajama-sample.txt",)},
}

#: Hub sources: (path, config name, split, text field, data_files, max rows).
_HUB: dict[str, dict[str, tuple[str, str | None, str, str, dict | None, int | None]]] = {
    "wikitext2": {"test": ("wikitext", "wikitext-2-raw-v1", "test", "text", None, None),
                  "calib": ("wikitext", "wikitext-2-raw-v1", "train", "text", None, None)},
    "ptb": {"test": ("ptb_text_only", "penn_treebank", "validation", "sentence", None, None),
            "calib": ("ptb_text_only", "penn_treebank", "train", "sentence", None, None)},
    "c4": {"test": ("allenai/c4", None, "validation", "text",
                    {"validation": "en/c4-validation.00000-of-00008.json.gz"}, 1100),
           "calib": ("allenai/c4", None, "train", "text",
                     {"train": "en/c4-train.00000-of-01024.json.gz"}, None)},
    "redpajama": {"calib": ("togethercomputer/RedPajama-Data-1T-Sample", None, "train", "text", None, None)},
}

#: Calibration text read from the hub is cut at this many characters (windows are drawn from it).
CALIB_MAX_CHARS = 20_000_000
DATASETS = tuple(LOCAL_FILES)


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the argument if given, else ``SPQR_DATA_DIR``, else None."""
    value = data_dir if data_dir is not None else os.environ.get("SPQR_DATA_DIR")
    return Path(value).expanduser() if value else None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when huggingface.co answers on port 443 within ``timeout`` seconds (cached per process)."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def settle_hub_mode(model_ref: str | None = None) -> None:
    """Switch huggingface_hub to cache-only mode when the hub cannot be reached (or SPQR_OFFLINE=1).

    Without this, loading a hub id offline retries for ~30 s. Nothing happens for a local model path or when
    HF_HUB_OFFLINE is already set. Call before transformers is imported (the CLI does).
    """
    if model_ref is not None and Path(model_ref).expanduser().exists():
        return
    if "HF_HUB_OFFLINE" in os.environ:
        return
    if _env_true("SPQR_OFFLINE") or not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"


def _read_rows(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpQRError(f"{path} is not UTF-8 text") from None
    return [line for line in text.splitlines() if line.strip()]


def _hub_rows(dataset: str, split: str) -> tuple[list[str] | None, str]:
    """Rows from the hub, or (None, why not)."""
    source = _HUB.get(dataset, {}).get(split)
    if source is None:
        return None, "no hub source for this split"
    if _env_true("SPQR_OFFLINE"):
        return None, "hub skipped (SPQR_OFFLINE=1)"
    cache_only = _env_true("HF_DATASETS_OFFLINE") or _env_true("HF_HUB_OFFLINE")
    if not cache_only and not hub_reachable():
        return None, "hub not reachable (no network)"
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` library is not installed"
    path, name, hub_split, field, data_files, max_rows = source
    try:
        ds = datasets.load_dataset(path, name, split=hub_split, data_files=data_files)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"datasets.load_dataset({path!r}) failed: {first[:200]}"
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows: list[str] = []
    total = 0
    for row in ds:
        text = row[field]
        rows.append(text)
        total += len(text)
        if split == "calib" and total >= CALIB_MAX_CHARS:
            break
    return rows, f"hub {path}"


def load_rows(dataset: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The rows of ``dataset``'s ``split`` and a short description of where they came from."""
    if split not in SPLITS:
        raise SpQRError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if dataset.startswith("file:"):
        path = Path(dataset[5:]).expanduser()
        if not path.is_file():
            raise SpQRError(f"data file {str(path)!r} not found (from --dataset {dataset})")
        return _read_rows(path), str(path)
    if dataset not in LOCAL_FILES:
        raise SpQRError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)} or file:PATH")
    names = LOCAL_FILES[dataset][split]
    if not names:
        raise SpQRError(f"dataset {dataset!r} has no {split} split; it is a calibration corpus only "
                        "(use it with `spqr calibrate`, evaluate on wikitext2, ptb, c4 or file:PATH)")
    root = data_dir_from_env(data_dir)
    tried: list[str] = []
    if root is not None:
        for name in names:
            candidate = root / name
            if candidate.is_file():
                return _read_rows(candidate), str(candidate)
            tried.append(str(candidate))
    rows, why = _hub_rows(dataset, split)
    if rows is not None:
        return rows, why
    looked = ", ".join(tried) if tried else "no data directory given"
    raise SpQRError(
        f"cannot load {dataset} ({split} split): {why}; looked locally at: {looked}. "
        f"Put a copy at DIR/{names[0]} (one row per line) and pass --data-dir DIR or set SPQR_DATA_DIR=DIR, "
        f"or use --dataset file:PATH")


def load_text(dataset: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """The split's text: rows joined with ``"\\n\\n"``; plus its source."""
    rows, source = load_rows(dataset, split, data_dir)
    text = JOINER.join(rows)
    if not text.strip():
        raise SpQRError(f"{source} holds no text")
    return text, source


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize the whole text once (special tokens as the tokenizer adds them, as in GPTQ); 1-D int64."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows from the start of ``ids``; the tail remainder is dropped. [W, seqlen]."""
    if seqlen < 2:
        raise SpQRError(f"--seqlen {seqlen} is too small; use at least 2 tokens")
    count = ids.numel() // seqlen
    if count == 0:
        raise SpQRError(f"the text has only {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise SpQRError("--max-windows must be >= 1")
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)


def test_windows(tokenizer: Any, dataset: str, seqlen: int, data_dir: str | os.PathLike | None = None,
                 max_windows: int | None = None) -> tuple[torch.Tensor, str]:
    """The evaluation windows [W, seqlen] of ``dataset``'s test split, and their source."""
    text, source = load_text(dataset, "test", data_dir)
    return split_windows(tokenize(tokenizer, text), seqlen, max_windows), source


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random starts (seeded); [nsamples, seqlen] int64."""
    if nsamples < 1 or seqlen < 1:
        raise SpQRError("--nsamples and --seqlen must be >= 1")
    if nsamples * seqlen > ids.numel():
        raise SpQRError(f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} tokens is more than "
                        f"the calibration text holds ({ids.numel()} tokens); lower them or use a larger corpus")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id): equal for interchangeable tokenizers."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()

