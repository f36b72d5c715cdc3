"""Several processes quantizing one model together (``torch.distributed``: NCCL on GPUs, gloo on CPUs).

Launched by ``spqr quantize --ranks N`` (``spawn``), ``torchrun --nproc-per-node N -m spqr_cli quantize ...`` (or
any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), or in a process group the
caller initialized. Each rank runs
the calibration windows of its share of the forward batches through every block; the Hessians are completed by
passing the running sum from rank to rank in window order (``chain_hessians``), so the fp32 additions happen in
exactly the order of one process and the records are bit-identical to a one-process run with the same
``forward_batch``. The layers of each block are then spread over the ranks round robin (``owner``; the layers of
a group quantized together, q/k/v or gate/up, run in parallel): each rank quantizes its own and the records are
broadcast (``share_record``; every rank needs all quantized weights for its next forward, and a record decodes to
the same weights wherever it was made). Rank 0 alone writes to disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError

COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (``rank`` 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes the records, the state, dense/ and the report, and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current_ranks() -> Ranks:
    """The ranks of the initialized default process group, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str) -> str:
    """Join the process group a launcher described in the environment (``WORLD_SIZE`` > 1), once: NCCL with
    ``cuda:LOCAL_RANK`` as the device when ``device`` is auto/cuda and GPUs exist, else gloo on the CPU. Returns
    the device this rank should use."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        # ranks wait in collectives while one of them quantizes a large layer or writes the packed checkpoint:
        # longer than the 10-minute default on a large model
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return device


def spawn(nproc: int, args: list[str], device: str) -> int:
    """Run ``spqr <args>`` as ``nproc`` ranks on this host (``torch.distributed.run``, standalone rendezvous) and
    return their exit code: one rank per GPU when ``device`` is cuda (or auto with GPUs), else CPU processes over
    gloo; each gets an equal share of the cores. SIGINT and SIGTERM sent to this process are passed on to the
    launcher, which stops the ranks, and waited for: no rank outlives the command."""
    import signal
    import subprocess
    import sys

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if device.startswith("cuda") and gpus == 0:
        raise SpQRError(f"--ranks {nproc} on --device {device}: no CUDA GPU is visible; use --device cpu for CPU "
                        "processes")
    if gpus and nproc > gpus:
        raise SpQRError(f"--ranks {nproc} needs {nproc} GPUs, {gpus} visible; use --ranks {gpus} or fewer")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spqr_cli", *args]
    launcher = subprocess.Popen(cmd, env=env)
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: launcher.send_signal(signum)) for s in caught}
    try:
        return launcher.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def window_share(nsamples: int, forward_batch: int, ranks: Ranks) -> slice:
    """This rank's calibration windows: a contiguous run of whole forward batches (the batches of one process,
    so every forward sees the same inputs as there)."""
    batches = -(-nsamples // forward_batch)
    if batches < ranks.world:
        raise SpQRError(f"{nsamples} calibration windows make {batches} forward batches of {forward_batch}, fewer "
                        f"than the {ranks.world} ranks; use more windows or fewer ranks")
    first = ranks.rank * batches // ranks.world
    last = (ranks.rank + 1) * batches // ranks.world
    return slice(first * forward_batch, min(last * forward_batch, nsamples))


def chain_hessians(accs: dict[str, Any], stored: dict[str, list[torch.Tensor]], ranks: Ranks) -> None:
    """Complete each ``HessianAccumulator`` in ``accs`` over every rank's inputs, in window order: rank r waits for
    the running sum of ranks < r, adds its own inputs (``stored``, in order), passes it on; the last rank's sum
    is broadcast. The additions are those of one process, in its order: the result is bit-identical."""
    import torch.distributed as dist

    last = ranks.world - 1
    for name, acc in accs.items():
        count = torch.zeros(1, dtype=torch.int64, device=acc._xtx.device)
        if ranks.rank > 0:
            dist.recv(acc._xtx, src=ranks.rank - 1)
            dist.recv(count, src=ranks.rank - 1)
            acc._n = int(count.item())
        for x in stored[name]:
            acc.add_batch(x)
        count.fill_(acc._n)
        if ranks.rank < last:
            dist.send(acc._xtx, dst=ranks.rank + 1)
            dist.send(count, dst=ranks.rank + 1)
        dist.broadcast(acc._xtx, src=last)
        dist.broadcast(count, src=last)
        acc._n = int(count.item())
        stored[name].clear()


def owner(index: int, ranks: Ranks) -> int:
    """The rank that quantizes the ``index``-th layer of a block (round robin)."""
    return index % ranks.world


def _collective_device() -> torch.device:
    """Where collectives' tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share_bytes(data: bytes | None, src: int) -> bytes:
    """``data`` of rank ``src`` on every rank (its length, then its bytes, broadcast); other ranks pass ``None``."""
    import torch.distributed as dist

    on = _collective_device()
    mine = dist.get_rank() == src
    size = torch.tensor([len(data) if mine and data is not None else 0], dtype=torch.int64, device=on)
    dist.broadcast(size, src=src)
    n = int(size.item())
    if n == 0:
        return b""
    if mine:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8).to(on)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=on)
    dist.broadcast(buf, src=src)
    return buf.cpu().numpy().tobytes()


def share_record(record: Any, seconds: float, src: int, device: torch.device) -> tuple[Any, float]:
    """A ``QuantizedLayer`` quantized on rank ``src`` (and the seconds it took there) on every rank, sent as
    safetensors bytes plus a JSON header (no pickle); the received record equals the sent one exactly. Its tensors
    land on ``device`` (the quantizing device): every rank decodes every record for its next forward, and on a
    GPU machine decoding them on the CPU took longer than quantizing (7B shape, 2 ranks: ~17 s of a 46 s run)."""
    import json

    from safetensors.torch import load, save

    from spqr_cli.quant.record import QuantizedLayer

    head = body = None
    if record is not None:
        head = json.dumps({"meta": record.meta(), "seconds": seconds}).encode()
        body = save(record.to_tensors())
    head_d = json.loads(share_bytes(head, src))
    tensors = {k: v.to(device) for k, v in load(share_bytes(body, src)).items()}
    return QuantizedLayer.from_tensors(head_d["meta"], tensors), float(head_d["seconds"])


def lead_step(ranks: Ranks, step: Callable[[], int | None]) -> int | None:
    """Run ``step`` on rank 0 only and give its result (an int or ``None``) to every rank; a one-line error there
    (``SpQRError``, or an ``OSError`` such as a full disk) is raised on every rank, so that the others do not wait
    for a collective that will never come. One process: just ``step()``."""
    if not ranks.distributed:
        return step()
    import torch.distributed as dist

    value, error = None, b""
    if ranks.lead:
        try:
            value = step()
        except (SpQRError, OSError) as e:
            error = (str(e) or type(e).__name__).encode()
    head = torch.tensor([len(error), -1 if value is None else int(value)], dtype=torch.int64,
                        device=_collective_device())
    dist.broadcast(head, src=0)
    if head[0] > 0:
        raise SpQRError(share_bytes(error if ranks.lead else None, 0).decode(errors="replace"))
    return None if head[1] < 0 else int(head[1])
