"""Perplexity with the GPTQ/SpQR protocol (see ``spqr_cli.core.data``).

``evaluate_perplexity`` takes an already-loaded model, so any module that maps input ids to logits
(a dense HF model, a packed one) is measured the same way; ``runtime.loader.load_any_model`` is the one place
that turns a path (hub id, HF directory, quantization output, packed checkpoint) into such a model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from spqr_cli.core.data import test_windows
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.models import execution_device, load_config, model_max_length, placement

DEFAULT_SEQLEN = 2048


@dataclass
class PerplexityResult:
    dataset: str
    source: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens: windows x (seqlen - 1)
    nll: float  # mean token negative log-likelihood (nats)
    perplexity: float
    seconds: float
    compute_dtype: str  # parameter dtype the forward pass ran in (fp16 weights run as fp32 on CPU)
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_seqlen(model_or_config: Any, seqlen: int | None = None) -> int:
    """``seqlen`` checked against the model's context, or 2048 capped by it."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = model_max_length(config)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, limit) if limit else DEFAULT_SEQLEN
    if limit is not None and seqlen > limit:
        raise SpQRError(f"--seqlen {seqlen} is larger than the model's context of {limit} tokens; "
                        f"use --seqlen {limit} or less")
    return seqlen


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: Any = None) -> float:
    """Mean next-token NLL over all windows (each window predicts its tokens 2..seqlen from the ones before).

    ``progress`` is an optional callable ``progress(n_windows_done)`` called after every batch.
    """
    if batch_size < 1:
        raise SpQRError("--batch-size must be >= 1")
    device = execution_device(model)  # (an offloaded model's first parameter may be on the meta device)
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift = logits[:, :-1, :].float()
        target = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
        if progress is not None:
            progress(batch.shape[0])
    return total / count


def evaluate_perplexity(model: nn.Module, tokenizer: Any, dataset: str, seqlen: int | None = None,
                        max_windows: int | None = None, batch_size: int = 1,
                        data_dir: str | os.PathLike | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset``'s test split: exp(mean token NLL over non-overlapping windows).

    ``seqlen`` defaults to 2048 capped by the model's context; ``max_windows`` keeps the first windows only.
    ``progress=True`` shows a rich progress bar with ETA on stderr.
    """
    seqlen = default_seqlen(model, seqlen)
    windows, source = test_windows(tokenizer, dataset, seqlen, data_dir, max_windows)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        if progress:
            from spqr_cli.core.progress import eta_progress

            with eta_progress("[bold]eval[/] {task.description}", "windows") as bar:
                task = bar.add_task(dataset, total=windows.shape[0])
                nll = windows_nll(model, windows, batch_size, lambda n: bar.advance(task, n))
        else:
            nll = windows_nll(model, windows, batch_size)
    finally:
        model.train(was_training)
    param = next(model.parameters())
    return PerplexityResult(
        dataset=dataset, source=source, seqlen=seqlen, windows=windows.shape[0],
        tokens=windows.shape[0] * (seqlen - 1), nll=nll, perplexity=math.exp(nll),
        seconds=time.perf_counter() - started, compute_dtype=str(param.dtype).removeprefix("torch."),
        device=placement(model))


def evaluate_path(path: str, dataset: str, **kwargs: Any) -> PerplexityResult:
    """``evaluate_datasets`` on one dataset (same keyword arguments)."""
    return evaluate_datasets(path, [dataset], **kwargs)[0]


def evaluate_datasets(path: str, datasets: Sequence[str], dtype: str = "fp16", device: str = "auto",
                      seqlen: int | None = None, max_windows: int | None = None, batch_size: int = 1,
                      data_dir: str | os.PathLike | None = None, progress: bool = False, verify: bool = True,
                      max_gpu_memory: str | int | None = None, max_cpu_memory: str | int | None = None,
                      offload_dir: str | os.PathLike | None = None) -> list[PerplexityResult]:
    """Load the model at ``path`` once (see ``load_any_model``) and measure its perplexity on each dataset, in
    order (checks --seqlen before loading the weights). ``max_gpu_memory`` / ``max_cpu_memory`` / ``offload_dir``:
    a model larger than the GPU or the host, placed by accelerate (``load_any_model``); the perplexity is the plain
    load's."""
    from spqr_cli.runtime.loader import load_any_model, model_kind

    if seqlen is not None:
        default_seqlen(load_config(model_kind(path)[1]), seqlen)
    model, tokenizer = load_any_model(path, dtype, device, verify=verify, max_gpu_memory=max_gpu_memory,
                                      max_cpu_memory=max_cpu_memory, offload_dir=offload_dir)
    return [evaluate_perplexity(model, tokenizer, dataset, seqlen=seqlen, max_windows=max_windows,
                                batch_size=batch_size, data_dir=data_dir, progress=progress) for dataset in datasets]
