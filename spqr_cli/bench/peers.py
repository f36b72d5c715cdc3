"""Peer kernels for ``spqr bench --peers``: the same layer shapes through other low-bit kernels, timed in the
same process as fp16 and ours.

- ``spqr-quant``: the SpQR authors' CUDA kernel (pip package ``spqr-quant``, compiled with nvcc by
  ``torch.utils.cpp_extension`` on its first import). It supports one configuration, 3-bit codes with 3-bit
  statistics in 16 x 16 groups, and one token per call (its ``forward`` loops over tokens), so it is timed at
  batch 1 only. Its matrix is made equivalent to ours: random 3-bit codes and statistics, the same number of
  outliers per row at the same column numbers (CSR), and the same input permutation as the ``PackedWeight`` it
  stands beside.
- ``gemlite``: a general low-bit Triton kernel library (``gemlite.helper.A16Wn``): 4-bit codes, groups of 128,
  fp16 scales and zeros, at every batch size (its own GEMV / split-K / GEMM choice per batch).

Each peer is checked against its own dequantized matrix (``rel_err``), so the table never times a call that
computes something else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spqr_kernels.layout import PackedWeight

PEERS = ("spqr-quant", "gemlite")
MAX_BATCH = {"spqr-quant": 1}  # tokens a peer runs as one call (absent: any)


def runs_batch(name: str, batch: int) -> bool:
    """Whether peer ``name`` is timed at ``batch`` tokens (spqr-quant's kernel is a matvec)."""
    return batch <= MAX_BATCH.get(name, batch)


@dataclass
class Peer:
    """One peer kernel ready to time on one layer shape.

    ``fn`` maps fp16 ``x [B, K]`` to ``y [B, N]``; ``dense`` is the ``[N, K]`` matrix the peer's own
    dequantization gives (fp16, on the GPU), used for ``rel_err``.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    dense: torch.Tensor


def parse_peers(spec: str) -> list[str]:
    """``"spqr-quant,gemlite"`` -> names, rejecting unknown ones with a message that lists the choices."""
    from spqr_cli.core.errors import SpQRError

    names = list(dict.fromkeys(p.strip().lower() for p in spec.split(",") if p.strip()))
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise SpQRError(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return names


def _missing(package: str, err: Exception, hint: str = "") -> Exception:
    """The one-line error for a peer that cannot be imported: not installed, or installed but failing to load
    (``hint``: what loading it needs)."""
    from spqr_cli.core.errors import SpQRError

    if isinstance(err, ModuleNotFoundError):
        return SpQRError(f"--peers {package} needs the {package!r} package on this GPU machine; install it with "
                         f"`pip install {package}` or leave it out of --peers")
    return SpQRError(f"--peers {package}: the installed package failed to load ({type(err).__name__}: {err}); "
                     f"{hint}fix that or leave it out of --peers")


def spqr_quant_peer(pw: PackedWeight, seed: int = 0) -> Peer:
    """The authors' kernel on a random 3-bit, 16 x 16 SpQR matrix with ``pw``'s outliers and permutation."""
    try:
        from spqr_quant.inference import (
            FeatureFlags,
            ModelArgs,
            QuantizedLinear,
            SparseStorageConfiguration,
            SPQRLegacy,
        )
        from spqr_quant.inference_kernels.cuda_kernel import call_dequantize_compressed
    except Exception as err:  # ImportError, or the nvcc build failing inside its import
        raise _missing("spqr-quant", err, "it builds with nvcc on import and needs the CUDA toolkit that matches "
                                          "torch; ") from err
    from spqr_cli.core.errors import SpQRError

    m, n, beta = pw.out_features, pw.in_features, 16
    if m % beta or n % beta:
        raise SpQRError(f"spqr-quant needs both dimensions divisible by 16, got {m} x {n}; leave it out of "
                        f"--peers for this shape")
    gen = torch.Generator().manual_seed(seed)
    tiles = (m // beta) * (n // beta)
    t = {k: v.cpu() for k, v in pw.tensors.items()}

    def second_order(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(tiles, generator=gen)).half()

    cols, vals = t["outlier_col"], t["outlier_val"]
    perm = t.get("perm", torch.arange(n, dtype=torch.int32))
    legacy = SPQRLegacy(
        m=m, n=n, bits=3, W=torch.randint(0, 8, (m, n), generator=gen, dtype=torch.int8), beta1=beta, beta2=beta,
        W_s=torch.randint(0, 8, (m * n // beta,), generator=gen, dtype=torch.int8),
        W_z=torch.randint(0, 8, (m * n // beta,), generator=gen, dtype=torch.int8),
        W_s_s=second_order(0.002, 0.004), W_s_z=second_order(-3, -2), W_z_s=second_order(0.4, 0.5),
        W_z_z=second_order(-0.5, 0.5), row_offsets=t["outlier_row_ptr"].int(), col_ids=cols.view(torch.int16),
        values=vals.half(), in_perm=perm.to(torch.int32),
    )
    layer = QuantizedLinear.from_legacy(legacy, ModelArgs(3, beta, beta, SparseStorageConfiguration.CSR), "cpu")
    dense = torch.zeros(m, n, dtype=torch.float16)
    call_dequantize_compressed(m, n, 3, beta, beta, layer.dense_weights, layer.row_offsets, layer.col_vals,
                               layer.nnz, dense)
    layer = layer.cuda()
    # the kernel reads x through in_perm (x_perm[j] = x[perm[j]]): compare with the dense matrix un-permuted
    dense_orig = torch.empty_like(dense)
    dense_orig[:, perm.long()] = dense
    y = torch.empty(m, dtype=torch.float16, device="cuda")
    flag = int(FeatureFlags.SPARSE_FUSED_FP32_ASYNC)  # the synchronous flag calls cudaDeviceSynchronize

    def fn(x: torch.Tensor) -> torch.Tensor:
        torch.ops.spqr_cuda.spqr_mul_fused(m, n, 3, beta, beta, layer.in_perm, layer.dense_weights,
                                           layer.row_offsets, layer.col_vals, layer.nnz, x.reshape(-1), flag, y, y)
        return y.view(1, m)

    nbytes = sum(p.numel() * p.element_size() for p in (layer.dense_weights, layer.row_offsets, layer.col_vals,
                                                         layer.in_perm))
    return Peer("spqr-quant", fn, nbytes, dense_orig.cuda())


def gemlite_peer(pw: PackedWeight, seed: int = 0, group_size: int = 128) -> Peer:
    """gemlite's A16W4 kernel (4-bit codes, fp16 scale and zero per ``group_size`` inputs) on a random matrix."""
    try:
        from gemlite.helper import A16Wn
    except Exception as err:
        raise _missing("gemlite", err) from err

    n_out, k = pw.out_features, pw.in_features
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n_out, k), generator=gen, device="cuda", dtype=torch.uint8)
    groups = k // group_size
    scales = (0.002 + 0.002 * torch.rand(n_out, groups, generator=gen, device="cuda")).half()
    zeros = (7.5 + torch.randn(n_out, groups, generator=gen, device="cuda")).half()
    dense = ((codes.view(n_out, groups, group_size).float() - zeros[..., None].float())
             * scales[..., None].float()).view(n_out, k).half()
    layer = A16Wn(device="cuda", dtype=torch.float16).from_weights(codes, scales, zeros, W_nbits=4,
                                                                     group_size=group_size)
    held = [*vars(layer).values(), *layer.parameters(), *layer.buffers()]  # gemlite keeps plain attributes too
    nbytes = sum({v.data_ptr(): v.numel() * v.element_size() for v in held if isinstance(v, torch.Tensor)}.values())
    return Peer("gemlite", layer, nbytes, dense)


def build_peer(name: str, pw: PackedWeight, seed: int = 0) -> Peer:
    """The peer ``name`` (one of ``PEERS``) on a matrix of ``pw``'s shape."""
    return {"spqr-quant": spqr_quant_peer, "gemlite": gemlite_peer}[name](pw, seed)
