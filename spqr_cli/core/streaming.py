"""Weights streamed from a safetensors checkpoint, one module at a time, and a dense checkpoint written the same way.

``spqr quantize`` must work on models far larger than host memory: the model is a skeleton on the meta device
(``core.models.empty_model``), and a decoder block's tensors are read from the checkpoint's shards only when that
block is processed (``CheckpointWeights.materialize``) and dropped after (``release``). The shard files are opened
per read and closed right after: a safetensors handle maps its whole file, and pages touched through a mapping
that stays open count in the process's resident memory, so one open handle on a single-file checkpoint would make
host memory grow with every block read from it.

``StreamedCheckpointWriter`` writes the dequantized model the same way: the header of every shard is known before
the first tensor (names, shapes and dtypes come from the skeleton), so each tensor is written at its offset as soon
as its block is done, and nothing but one block is ever held for the output either.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import SHARD_INDEX, write_shard_index

SINGLE_NAME = "model.safetensors"
# safetensors' dtype names (the header's "dtype" field)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def host_rss_mb() -> float:
    """This process's resident memory now (MB): ``/proc/self/statm`` on Linux, else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def local_model_dir(name_or_path: str) -> Path:
    """The directory holding the checkpoint's files: the path itself, or a hub id's local snapshot (downloaded
    through huggingface_hub when online; offline, the cache only). Only config and safetensors files are fetched:
    the tokenizer is loaded by transformers, and pickle weights are never read."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["config.json", "generation_config.json",
                                                                  "*.safetensors", SHARD_INDEX])
                    ).resolve()
    except Exception as e:  # offline cache miss, unknown repo, network: one line
        raise SpQRError(f"cannot load model {name_or_path!r}: {_first_line(e)}; the weights are missing or damaged "
                        "(re-download or re-save the model)") from None


class CheckpointWeights:
    """Name -> tensor access to a Hugging Face safetensors checkpoint (``model.safetensors`` or an index and its
    shards), reading headers only until a tensor is asked for.

    ``key_prefix`` is prepended to checkpoint names that lack the model's base prefix (e.g. OPT checkpoints that
    store ``decoder.layers.0...`` for ``model.decoder.layers.0...``); ``resolve`` maps a model name back to the
    checkpoint's name.
    """

    def __init__(self, directory: str | Path, name: str | None = None,
                 fix: str = "re-download or re-save the model") -> None:
        """``name``: how errors call the checkpoint; ``fix``: what they tell the user to do (a quantization
        output's dense/ is re-made by re-running quantize, a hub model is re-downloaded)."""
        from safetensors import safe_open

        self.directory = Path(directory)
        self.name = name or str(directory)
        self.fix = fix
        index = self.directory / SHARD_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values()):
                    raise ValueError("weight_map is not a mapping of tensor names to shard files")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise self._damaged(f"{SHARD_INDEX}: {_first_line(e)}") from None
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise SpQRError(f"cannot load model {self.name!r}: no {SINGLE_NAME} or {SHARD_INDEX} in {self.directory}; "
                            f"the weights are missing ({self.fix})")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        self.headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.file_of: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(str(self.directory / file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                        piece = f.get_slice(key)
                        self.headers[key] = (tuple(piece.get_shape()), _ST_DTYPES.get(piece.get_dtype(),
                                                                                      torch.float32))
                        self.file_of[key] = file
            except Exception as e:  # missing shard, damaged header, truncated file
                raise self._damaged(f"{file}: {_first_line(e)}") from None
        if weight_map is not None:
            listed = [k for k, v in weight_map.items() if self.file_of.get(k) != v]
            if listed:
                raise self._damaged(f"{SHARD_INDEX} lists {listed[0]} in {weight_map[listed[0]]}, which does not "
                                    "hold it")
        self.key_prefix = ""

    def _damaged(self, what: str) -> SpQRError:
        return SpQRError(f"cannot load model {self.name!r}: {what}; the weights are missing or damaged (corrupted or "
                         f"truncated): {self.fix}")

    def align_to(self, expected: Iterable[str], base_prefix: str) -> None:
        """Use ``base_prefix`` for checkpoint names when none of them carries it but the model's names do."""
        expected = set(expected)
        if base_prefix and not (set(self.headers) & expected) and any(
                f"{base_prefix}.{k}" in expected for k in self.headers):
            self.key_prefix = f"{base_prefix}."

    def model_names(self) -> dict[str, str]:
        """Model name -> checkpoint name, for every tensor of the checkpoint."""
        return {self.key_prefix + k: k for k in self.headers}

    def shape(self, model_name: str) -> tuple[int, ...]:
        return self.headers[self.resolve(model_name)][0]

    def resolve(self, model_name: str) -> str:
        if self.key_prefix and model_name.startswith(self.key_prefix):
            return model_name[len(self.key_prefix):]
        return model_name

    def get(self, name: str) -> torch.Tensor:
        """One tensor by its checkpoint name."""
        return self.read([name])[name]

    def read(self, model_names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (model names), each shard opened once for this call and closed after."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in model_names:
            key = self.resolve(name)
            if key not in self.file_of:
                raise self._damaged(f"no tensor {key}")
            by_file.setdefault(self.file_of[key], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(self.directory / file), framework="pt") as f:
                    for name in names:
                        out[name] = f.get_tensor(self.resolve(name))
            except Exception as e:  # a shard damaged or truncated after its header was read
                raise self._damaged(f"{file}: {_first_line(e)}") from None
        return out

    def materialize(self, module: nn.Module, prefix: str, dtype: torch.dtype,
                    skip: Iterable[str] = ()) -> None:
        """Load ``module``'s parameters and persistent buffers (names under ``prefix`` in the model) from the
        checkpoint onto the host, floating ones cast to ``dtype`` (as ``from_pretrained(dtype=...)`` does).
        Tensors named in ``skip`` (relative names) stay on the meta device: the caller replaces them."""
        skip = set(skip)
        wanted = [name for name in module.state_dict(keep_vars=True) if name not in skip]
        full = {name: f"{prefix}.{name}" if prefix else name for name in wanted}
        tensors = self.read(full.values())
        for name in wanted:
            t = tensors.pop(full[name])
            if t.is_floating_point():
                t = t.to(dtype)
            _set_tensor(module, name, t)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters and persistent buffers back on the meta device (their memory is freed); the
    non-persistent buffers (rotary tables computed at construction) are kept."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for leaf, b in list(sub._buffers.items()):
            if b is not None and leaf not in sub._non_persistent_buffers_set:
                sub._buffers[leaf] = torch.empty_like(b, device="meta")


def trim_host_memory() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Why: freeing a block's tensors returns them to glibc's heap, not to the system, and the next block's
    allocations (of other sizes, interleaved with the reader's buffers) do not fit the holes exactly, so without
    this the resident memory measured on a width-1024 model grew by ~30 MB per block; with it, it stays flat.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def available_host_bytes() -> int | None:
    """Host memory this process could take now without swapping: the kernel's ``MemAvailable``, or less where a
    cgroup (v2: a container's memory limit) leaves less; ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller here
    return avail


def disk_empty(shape: torch.Size, dtype: torch.dtype, directory: str | Path) -> torch.Tensor:
    """An uninitialized tensor backed by a file in ``directory`` (shared memory map): the kernel keeps the pages
    it can in RAM and writes the rest back to the file, so a buffer larger than host memory still works.

    The file is unlinked as soon as it exists: its space returns to the disk when the tensor dies or the process
    ends, killed or not, and nothing is left behind. Its blocks are reserved up front, so a full disk is an error
    here rather than a SIGBUS on a later write (on a copy-on-write filesystem such as btrfs or ZFS rewrites need
    new blocks, and that guarantee does not hold: put --offload-dir elsewhere there).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    fd, name = tempfile.mkstemp(prefix="spqr-activations-", suffix=".bin", dir=directory)
    try:
        os.unlink(name)
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                hint = "free space there or choose" if e.errno == errno.ENOSPC else "choose another directory with"
                raise SpQRError(f"cannot reserve {nbytes / 2**30:.2f} GB for the calibration activations in "
                                f"{directory} ({e.strerror}); {hint} --offload-dir") from None
        return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)  # the mapping keeps the file


PIN_REGISTER_MIN = 64 * 2**20  # smaller buffers take torch's pinned allocator (its rounding wastes < 64 MB)


def pinned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized host tensor in page-locked memory of its own size (``RuntimeError`` if CUDA cannot pin it).

    Why not ``torch.empty(..., pin_memory=True)`` alone: torch's pinned allocator rounds every allocation up to a
    power of two, so the 2.5 GB activation buffer of a 13B-shaped run at 128 x 2048 took 4 GB of host memory. A
    large ordinary allocation (``PIN_REGISTER_MIN`` and up: mapped pages of its own, shared with no other
    allocation) is registered with CUDA instead, and unregistered when the tensor dies.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < PIN_REGISTER_MIN:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    t = torch.empty(shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(t.data_ptr(), nbytes, 1)) != 0:  # 1: cudaHostRegisterPortable
        _clear_cuda_error()
        raise RuntimeError(f"CUDA could not page-lock {nbytes / 2**30:.2f} GB of host memory")
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call that torch did not make: torch checks that error
    after each kernel it launches and would report this failure there, as if the kernel had failed."""
    import ctypes

    with open("/proc/self/maps") as maps:  # the libcudart torch loaded (same handle, same error state)
        path = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
    if path is not None:
        ctypes.CDLL(path).cudaGetLastError()


class StreamedCheckpointWriter:
    """A Hugging Face safetensors checkpoint written tensor by tensor, in any order, never holding more than the
    tensor being written.

    ``tensors`` (name -> (shape, dtype), in the order they will be written) fixes every shard's header up front:
    shards of at most ``max_shard_bytes`` are ``model-0000i-of-0000N.safetensors`` plus the index, or a single
    ``model.safetensors``. Each ``write`` puts the bytes at their offset; ``close`` checks that every tensor was
    written (a half-written file is never left under a final name: the caller writes into a temporary directory).
    """

    def __init__(self, directory: str | Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30) -> None:
        self.directory = Path(directory)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in tensors.items():
            nbytes = _numel(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        total = len(shards)
        self.files = [SINGLE_NAME] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                      for i in range(total)]
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard, absolute start, nbytes)
        self.shapes = tensors
        self.total_size = 0
        for shard, (file, names) in enumerate(zip(self.files, shards, strict=True)):
            head, offsets = safetensors_header({name: tensors[name] for name in names}, {"format": "pt"})
            size = sum(end - start for start, end in offsets.values())
            with open(self.directory / file, "wb") as f:
                f.write(head)
                f.truncate(len(head) + size)
            for name, (start, end) in offsets.items():
                self.where[name] = (shard, len(head) + start, end - start)
            self.total_size += size
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, start, nbytes = self.where[name]
        shape, dtype = self.shapes[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise SpQRError(f"internal error: {name} is {tuple(tensor.shape)} {tensor.dtype}, the header says "
                            f"{tuple(shape)} {dtype}")
        data = tensor_bytes(tensor)
        assert data.nbytes == nbytes
        with open(self.directory / self.files[shard], "r+b") as f:
            f.seek(start)
            f.write(data)
        self.written.add(name)

    def close(self) -> None:
        missing = [n for n in self.shapes if n not in self.written]
        if missing:
            raise SpQRError(f"internal error: {len(missing)} tensors of the output were never written "
                            f"(first: {missing[0]})")
        write_shard_index(self.directory, {n: self.files[self.where[n][0]] for n in self.shapes},
                          {"total_size": self.total_size})


def safetensors_header(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """What precedes the data of a safetensors file holding ``tensors`` (name -> (shape, dtype)) in this order:
    the header's length (8 bytes, little-endian) and the JSON header, padded so the data starts 8-byte aligned
    as safetensors writes it; and each tensor's (start, end) byte offsets within the data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = _numel(shape) * _itemsize(dtype)
        offsets[name] = (offset, offset + nbytes)
        header[name] = {"dtype": safetensors_dtype(dtype, name), "shape": list(shape),
                        "data_offsets": list(offsets[name])}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def safetensors_dtype(dtype: torch.dtype, name: str) -> str:
    """safetensors' name of ``dtype`` (the header's "dtype" field); an error for one it cannot hold."""
    if dtype not in _ST_NAMES:
        raise SpQRError(f"tensor {name} has dtype {dtype}, which this writer does not store in safetensors")
    return _ST_NAMES[dtype]


def copy_bytes(src: BinaryIO, dst: BinaryIO, nbytes: int, chunk: int = 16 * 2**20) -> None:
    """Copy ``nbytes`` from ``src``'s position to ``dst``, ``chunk`` at a time; an error if ``src`` ends first."""
    while nbytes > 0:
        data = src.read(min(chunk, nbytes))
        if not data:
            raise SpQRError("internal error: a shard's data file ended early")
        dst.write(data)
        nbytes -= len(data)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s bytes as safetensors stores them (C order, little-endian: this host's), without a copy when ``t``
    is a contiguous CPU tensor."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` directory to ``path``; the previous one stays beside it until the rename, so
    there is never a moment without a complete directory under one of the two names."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
