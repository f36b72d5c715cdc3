"""Atomic file writes and strict JSON reads: the one place that decides how the tool touches the disk.

Every artifact is written to a temporary file in its final directory and renamed over the final name, so an
interrupted run (a kill, a full disk) never leaves a half-written file under a name another command trusts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
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
        # mkstemp (and safetensors, which recreates the file) make 0600; a plain open() honours the umask
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (with a final newline) atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
    return Path(path)


SHARD_INDEX = "model.safetensors.index.json"  # transformers' map of tensor names to shard files


def write_shard_index(directory: str | os.PathLike, weight_map: dict[str, str],
                      metadata: dict[str, Any] | None = None) -> list[str]:
    """The shard files of a checkpoint written to ``directory`` (tensor name -> file in ``weight_map``), sorted,
    after writing ``model.safetensors.index.json`` when there are several: transformers finds multi-shard weights
    through that index and a single file needs none. Readable like the shards; written inside a directory that is
    itself renamed into place when complete."""
    shards = sorted(set(weight_map.values()))
    if len(shards) > 1:
        path = Path(directory) / SHARD_INDEX
        path.write_text(json.dumps({"metadata": metadata or {}, "weight_map": dict(sorted(weight_map.items()))},
                                   indent=2) + "\n")
        chmod_like_open(path)
    return shards


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SpQRError(f"{path} is unreadable or corrupted ({type(e).__name__}); re-create it") from None
    if not isinstance(data, dict):
        raise SpQRError(f"{path} is corrupted (not a JSON object); re-create it")
    return data


# ---------------------------------------------------------------------------------------------------------------
# output directories: permissions, one writer at a time, atomic swap, recovery after a kill


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def user_os_errors(what: str) -> Iterator[None]:
    """Turn file-system errors (read-only dir, full disk, a path below a regular file) into one-line
    ``SpQRError``s naming ``what`` was being written; the traceback helps nobody there."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        hint = "free some space" if e.errno == errno.ENOSPC else "check the path and its permissions"
        raise SpQRError(f"cannot write {what}: {reason}; {hint} and run again (nothing was changed)") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<parent>/.<name>.lock`` (created with O_EXCL, holding our pid) while writing ``out_dir``.

    Two commands writing one output would otherwise both succeed and the second would delete the first. A lock
    whose pid is dead (a killed run) is taken over; a live one is an error. A lock with no pid yet is treated as
    live for a few seconds (its writer may be between creating and writing it).
    """
    out_dir = Path(out_dir)
    lock = lock_path(out_dir)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if _lock_is_live(lock):
                raise SpQRError(f"another spqr is writing {out_dir} (lock {lock}); wait for it to finish, or "
                                "delete the lock if no spqr is running") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise SpQRError(f"cannot take the lock {lock} for {out_dir}; another spqr keeps writing it")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _lock_is_live(lock: Path) -> bool:
    try:
        text = lock.read_text().strip()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not text.isdigit():
        return age < 10
    return _pid_alive(int(text))


def recover_output(out_dir: str | os.PathLike) -> None:
    """Clean what a killed writer left beside ``out_dir`` (call it holding ``output_lock``).

    ``.<name>.tmp-*`` are unfinished outputs: deleted. ``.<name>.old-*`` is the previous output set aside by
    ``swap_in``: if the kill came before the new one was renamed in, it is put back under the name, else deleted.
    """
    out_dir = Path(out_dir)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        _remove(tmp)
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if not out_dir.exists() and not out_dir.is_symlink():
            _rename(old, out_dir)
        else:
            _remove(old)


def make_temp_dir(out_dir: str | os.PathLike) -> Path:
    """A fresh ``.<name>.tmp-*`` dir beside ``out_dir`` (same file system: the final rename is atomic), with the
    permissions a plain mkdir gives under the umask (mkdtemp makes 0700)."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def chmod_like_open(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open()`` would under the umask (safetensors writes its files 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def _rename(src: Path, dst: Path) -> None:
    """``os.rename``; one name so tests can interrupt a swap between its two renames."""
    os.rename(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def swap_in(tmp: Path, out_dir: str | os.PathLike) -> None:
    """Put the finished ``tmp`` under ``out_dir``: old output renamed aside, new renamed in, then old deleted.

    At every instant the name holds the old or the new complete output, or (between the two renames) nothing,
    with the old one intact as ``.<name>.old-*`` for ``recover_output`` to put back. An error between the renames
    puts it back at once.
    """
    out_dir = Path(out_dir)
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        _rename(out_dir, old)
    try:
        _rename(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            _rename(old, out_dir)
        raise
    if old is not None:
        _remove(old)
