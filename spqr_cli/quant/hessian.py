"""The calibration statistic of a linear layer: ``H = 2/n · Σ x xᵀ`` over its input tokens, in fp32; and, for
asymmetric calibration, the weight target that statistic is used with (``asym_target``)."""

from __future__ import annotations

import torch

from spqr_cli.core.errors import SpQRError


class HessianAccumulator:
    """Accumulates H = 2/n * sum x x^T in fp32 over calibration tokens for one linear layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (``[..., in_features]``, any float dtype); every row is one token."""
        if x.shape[-1] != self.in_features:
            raise SpQRError(
                f"calibration input has {x.shape[-1]} features, but this layer has {self.in_features} inputs"
            )
        x = x.reshape(-1, self.in_features).to(device=self._xtx.device, dtype=torch.float32)
        self._xtx.addmm_(x.T, x)
        self._n += x.shape[0]

    @property
    def nsamples(self) -> int:
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        if self._n == 0:
            raise SpQRError("no calibration inputs reached this layer; the Hessian is undefined")
        h = self._xtx * (2.0 / self._n)
        if not torch.isfinite(h).all():
            raise SpQRError("the calibration inputs of this layer contain inf/nan (check the model's dtype)")
        return h


def damp_(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Damp ``h`` in place as the column loop does: ``percdamp`` times its mean diagonal added to the diagonal,
    and dead inputs (zero diagonal: the input is always zero) set to 1. Returns ``h``."""
    dead = torch.diag(h) == 0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.diag(h).abs().mean()
    h[idx[dead], idx[dead]] = 1.0
    return h


def asym_target(weight: torch.Tensor, hessian: torch.Tensor, delta: torch.Tensor, percdamp: float) -> torch.Tensor:
    """GPTAQ's target weight for asymmetric calibration, fp32 ``[N, K]``.

    The quantized model feeds a layer inputs ``X`` (rows: tokens) where the fp16 model feeds it ``X_fp`` on the
    same tokens. Asking the quantized layer ``Q`` for the fp16 layer's output there, ``min_Q ||X_fp Wᵀ - X Qᵀ||``,
    is the usual GPTQ objective ``||X (W* - Q)ᵀ||`` (so the usual column loop) for
    ``W* = W + W D H⁻¹``, with ``H = 2/n XᵀX`` (``hessian``) and ``D = 2/n (X_fp - X)ᵀX`` (``delta``): the normal
    equations of the least-squares fit. ``H`` is damped as the column loop damps it (``percdamp`` times its mean
    diagonal, dead inputs set to 1), which keeps ``W*`` finite and makes ``W* = W`` exactly when ``X_fp = X``.
    """
    h = damp_(hessian.to(torch.float32, copy=True), percdamp)
    w = weight.to(torch.float32)
    lower, info = torch.linalg.cholesky_ex(h)
    del h  # (H and D are alive too: at most three [K, K] matrices here)
    if info.item() != 0:
        raise SpQRError(f"the damped Hessian is not positive definite (percdamp {percdamp}); raise --percdamp or "
                        "use more calibration data")
    correction = torch.cholesky_solve((w @ delta.to(torch.float32)).T, lower).T  # W D H⁻¹ (H symmetric)
    return w + correction
