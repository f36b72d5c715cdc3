"""Asymmetric calibration (``--asym-calib``, GPTAQ): the target weight is the least-squares fit it claims to be, a
run differs from the symmetric one only where the two models' activations differ, and a killed run resumes
exactly (the fp16 model's activations are replayed through the original blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spqr_cli.core.config import QuantConfig, load_preset
from spqr_cli.core.errors import ConfigError, SpQRError
from spqr_cli.quant import driver
from spqr_cli.quant.hessian import asym_target

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "docs-llama-3m"


def test_asym_target_is_the_least_squares_fit() -> None:
    """``W*`` solves ``min ||X_fp Wᵀ - X W*ᵀ||`` (checked against ``torch.linalg.lstsq`` in float64, with negligible
    damping), and with ``X_fp = X`` it is ``W`` itself, bit for bit, whatever the damping."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=gen, dtype=torch.float64)
    x_fp = x + 0.1 * torch.randn(512, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 24, generator=gen, dtype=torch.float64)
    h = 2 / 512 * x.T @ x
    d = 2 / 512 * (x_fp - x).T @ x
    fit = torch.linalg.lstsq(x, x_fp @ w.T).solution.T
    got = asym_target(w.float(), h.float(), d.float(), percdamp=1e-9)
    assert torch.allclose(got.double(), fit, rtol=1e-3, atol=1e-4)
    assert torch.equal(asym_target(w.float(), h.float(), torch.zeros_like(h).float(), percdamp=1.0), w.float())


def test_collect_asym_statistics_of_a_toy_block() -> None:
    """``H`` and ``D`` of a layer whose inputs differ between the partly quantized block and the original one (the
    layer before it changed), against the formulas written out; the forwards stop at the layer."""
    from torch import nn

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.lin, self.post = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.post(self.lin(torch.tanh(self.pre(x))))

    torch.manual_seed(0)
    orig = Toy().requires_grad_(False)
    block = Toy().requires_grad_(False)
    block.load_state_dict(orig.state_dict())
    block.pre.weight += 0.05 * torch.randn(6, 6)  # as if "pre" had been quantized
    block.post.register_forward_hook(lambda *_: pytest.fail("the forward ran past the last layer fed"))
    inps, inps_fp = torch.randn(5, 4, 6), torch.randn(5, 4, 6)
    hessians, deltas = driver._collect_asym(block, orig, {"lin": block.lin}, inps, inps_fp, {}, torch.device("cpu"),
                                            torch.float32, batch=2)
    x = torch.tanh(block.pre(inps)).reshape(-1, 6)
    x_fp = torch.tanh(orig.pre(inps_fp)).reshape(-1, 6)
    assert torch.allclose(hessians["lin"], 2 / 20 * x.T @ x, atol=1e-5)
    assert torch.allclose(deltas["lin"], 2 / 20 * (x_fp - x).T @ x, atol=1e-5)


def test_asym_calib_is_saved_only_when_on_and_refused_where_it_cannot_run() -> None:
    cfg = load_preset("spqr-3.9bit")
    assert "asym_calib" not in cfg.to_dict()
    on = cfg.replace(asym_calib=True)
    assert on.to_dict()["asym_calib"] is True and QuantConfig.from_dict(on.to_dict()) == on
    driver.check_ranks(on, 1)
    with pytest.raises(ConfigError, match="different directions"):
        on.replace(tune_steps=8)
    with pytest.raises(ConfigError, match="uses no calibration"):
        load_preset("rtn-4bit-g128").replace(asym_calib=True)
    with pytest.raises(SpQRError, match="pass --no-asym-calib"):
        driver.check_ranks(on, 2)


def _records(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted((out / "records").glob("*.safetensors"))}


CALIB = torch.randint(3, 8000, (8, 32), generator=torch.Generator().manual_seed(0))
CFG = load_preset("spqr-3.9bit").replace(clip_grid=0)


def _plain_and_asym(tmp_path: Path, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize the 3m model with and without ``--asym-calib``; check they differ exactly where the two models'
    activations do; return the asymmetric run's records."""
    plain, asym = tmp_path / "plain", tmp_path / "asym"
    driver.quantize_model(str(MODEL), CFG, plain, CALIB, device=device, dense=False)
    driver.quantize_model(str(MODEL), CFG.replace(asym_calib=True), asym, CALIB, device=device, dense=False)
    a, b = _records(plain), _records(asym)
    first = "block_0000.safetensors"
    q_proj = [k for k in a[first] if "q_proj" in k]
    # block 0's first group sees the same inputs in both models: the same records; everything after differs
    assert q_proj and all(torch.equal(a[first][k], b[first][k]) for k in q_proj)
    later = [name for name in a if name != first]
    assert later and all(any(not torch.equal(a[n][k], b[n][k]) for k in a[n] if k.endswith(".codes")) for n in later)
    return b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_asym_run_on_gpu_differs_where_activations_differ(tmp_path: Path) -> None:
    _plain_and_asym(tmp_path, "cuda")


def test_asym_run_differs_where_activations_differ_and_resumes_exactly(tmp_path: Path, resume_after_kill) -> None:
    b = _plain_and_asym(tmp_path, "cpu")
    on, calib = CFG.replace(asym_calib=True), CALIB

    out = tmp_path / "resumed"
    resume_after_kill(lambda: driver.quantize_model(str(MODEL), on, out, calib, device="cpu", dense=False))
    c = _records(out)
    assert c.keys() == b.keys()
    assert all(torch.equal(b[n][k], c[n][k]) for n in b for k in b[n])
