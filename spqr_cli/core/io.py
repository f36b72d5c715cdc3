"""Atomic file writes and strict JSON reads: the one place that decides how the tool touches the disk.

Every artifact is written to a temporary file in its final directory and renamed over the final name, so an
interrupted run (a kill, a full disk) never leaves a half-written file under a name another command trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spqr_cli.core.errors import SpQRError

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (with a final newline) atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
    return Path(path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` written atomically; returns the path."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing, unreadable or non-object files are one-line ``SpQRError``s that
    name ``what`` the directory was expected to be."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpQRError(f"{path} not found; is {path.parent} a {what}?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpQRError(f"{path} is unreadable or corrupted ({type(e).__name__}); re-create it") from None
    if not isinstance(data, dict):
        raise SpQRError(f"{path} is corrupted (not a JSON object); re-create it")
    return data
