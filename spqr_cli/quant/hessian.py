"""The calibration statistic of a linear layer: ``H = 2/n · Σ x xᵀ`` over its input tokens, in fp32."""

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
