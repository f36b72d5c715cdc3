"""``spqr export --to hf-spqr`` / ``spqr import``: the transformers/authors SpQR format.

The exported tensors are decoded by a reference decoder written here from the format's description (authors'
``spqr_quant`` QuantizedLinear docstring and ``convert_to_hf.py``, docs/format.md), not by the import code, and
compared with our dequantized weights exactly. The model is the session's real spqr-3.9bit quantization of
docs-llama-3m (``quantized_demo``: w3, 3-bit stats, 16x16, act-order, outliers).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import read_packed
from spqr_cli.format.hf_spqr import export_hf_spqr, import_hf_spqr
from spqr_cli.format.pack import pack_model
from spqr_cli.quant.record import QuantizedLayer
from spqr_cli.runtime.loader import load_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pack import build_quant_dir, tiny_llama  # noqa: E402


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` calls -0.0 and +0.0 equal): floats compared as their integer bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def dirs(quantized_demo, tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfspqr")
    packed = quantized_demo["packed"]
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(packed), "--to", "hf-spqr", "--out", str(root / "hf")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["import", str(root / "hf"), "--out", str(root / "back")])
    assert res.exit_code == 0, res.output
    return {"packed": packed, "hf": root / "hf", "back": root / "back"}


def _half(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def reference_decode(rows: int, cols: int, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp16 weight ``[rows, cols]`` of one hf-spqr layer, from the format description, plain Python loops.

    dense_weights: one uint64 per tile row, tile (ti, tj) row r at ti * cols + 16 tj + r; bits 0-2 scale code,
    3-5 zero code, 6 + 3i code of column i of the tile, 54-61 byte r // 2 of the tile's 64-bit second-order value
    (fp16 x4: scale-of-scale, scale-of-zero, zero-of-scale, zero-of-zero). Columns are permuted: permuted column
    j is input in_perm[j] (uint16 pairs in int32, low half first). s = ss * (s_code - sz), z = zs * (z_code - zz),
    w = s * (q - z) in fp32, rounded to fp16 once; sparse entries (CSR row_offsets, col_vals = fp16 << 16 | permuted
    column) are added to the weight, exactly, then rounded.
    """
    dw = [int(v) & (2**64 - 1) for v in t["dense_weights"].tolist()]
    perm_words = [int(v) & 0xFFFFFFFF for v in t["in_perm"].tolist()]
    perm = [p for w in perm_words for p in (w & 0xFFFF, w >> 16)] or list(range(cols))
    dense = [[0.0] * cols for _ in range(rows)]
    for ti in range(rows // 16):
        for tj in range(cols // 16):
            base = ti * cols + 16 * tj
            second = 0
            for r in range(16):
                second |= ((dw[base + r] >> 54) & 0xFF) << (8 * (r // 2))
            ss, zs, sz, zz = (_half(second >> (16 * i)) for i in range(4))
            for r in range(16):
                w = dw[base + r]
                f32 = torch.float32
                s = torch.tensor(ss, dtype=f32) * (float(w & 7) - torch.tensor(sz, dtype=f32))
                z = torch.tensor(zs, dtype=f32) * (float((w >> 3) & 7) - torch.tensor(zz, dtype=f32))
                for i in range(16):
                    q = float((w >> (6 + 3 * i)) & 7)
                    dense[16 * ti + r][16 * tj + i] = float((s * (q - z)).to(torch.float16))
    offsets = t["row_offsets"].tolist()
    assert len(offsets) == rows + 1  # CSR
    cv = [int(v) & 0xFFFFFFFF for v in t["col_vals"].tolist()]
    for r in range(rows):
        for e in range(offsets[r], offsets[r + 1]):
            dense[r][cv[e] & 0xFFFF] += _half(cv[e] >> 16)  # Python floats: exact for these sums
    permuted = torch.tensor(dense, dtype=torch.float64).to(torch.float16)
    out = torch.empty_like(permuted)
    out[:, perm] = permuted
    return out


def test_export_decodes_to_our_weights_exactly(dirs) -> None:
    hf = dirs["hf"]
    config = json.loads((hf / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["beta1"], qc["beta2"]) == ("spqr", 3, 16, 16)
    assert qc["modules_to_not_convert"] == ["lm_head", "lm_head.weight"]
    tensors = load_file(str(hf / "model.safetensors"))
    layers, dense = read_packed(dirs["packed"])
    assert len(layers) == 28
    checked = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj"]
    assert all(layers[name].nnz > 0 for name in checked)  # the residual entries are exercised, ...
    assert any(tensors[f"{n}.col_vals"].numel() > layers[n].nnz for n in checked)  # ... some as two entries
    for name in checked:  # the pure-Python decoder is slow: three layers of each shape class
        pw = layers[name]
        t = {k: tensors[f"{name}.{k}"] for k in ("dense_weights", "row_offsets", "col_vals", "in_perm")}
        assert t["dense_weights"].dtype == torch.int64 and t["col_vals"].dtype == torch.int32
        assert qc["shapes"][f"{name}.dense_weights.shape"] == pw.out_features * pw.in_features // 16
        got = reference_decode(pw.out_features, pw.in_features, t)
        assert same_bits(got, QuantizedLayer.from_packed(pw).dequantize())
    for name, t in dense.items():
        assert same_bits(tensors[name], t)
    assert "lm_head.weight" not in tensors  # tied, as in ours


def test_round_trip_is_bit_exact(dirs) -> None:
    a_layers, a_dense = read_packed(dirs["packed"])
    b_layers, b_dense = read_packed(dirs["back"])
    assert set(a_layers) == set(b_layers) and set(a_dense) == set(b_dense)
    for name, pw in a_layers.items():
        other = b_layers[name]
        assert pw.meta() == other.meta() and set(pw.tensors) == set(other.tensors)
        assert all(same_bits(v, other.tensors[k]) for k, v in pw.tensors.items()), name
    assert all(same_bits(v, b_dense[k]) for k, v in a_dense.items())
    ids = torch.randint(0, 8192, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_packed(dirs["packed"], dtype=torch.float32)(ids).logits
        got = load_packed(dirs["back"], dtype=torch.float32)(ids).logits
    assert same_bits(ref, got)


def test_model_that_does_not_fit_gets_one_clear_error(tmp_path: Path) -> None:
    q = build_quant_dir(tmp_path / "q", tiny_llama(), QuantConfig(wbits=4, stat_bits=3))
    pack_model(q, tmp_path / "p")
    with pytest.raises(SpQRError, match=r"does not fit the hf-spqr format: layer model\.layers\.0\.\S+ has wbits=4"):
        export_hf_spqr(tmp_path / "p", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    res = CliRunner().invoke(app, ["export", str(tmp_path / "p"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 2 and "wbits=4" in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path / "p"), "--to", "gguf", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "hf-spqr" in res.output


def test_import_refuses_other_checkpoints(dirs, tmp_path: Path) -> None:
    with pytest.raises(SpQRError, match="not a transformers SpQR checkpoint"):
        import_hf_spqr(dirs["packed"], tmp_path / "x")  # ours (quant_method spqr-cli)

def test_import_refuses_checkpoints_that_would_not_load(dirs, tmp_path: Path) -> None:
    """A stray or a missing tensor is refused before anything is written: a valid --out stays as it was."""
    import shutil

    from safetensors.torch import save_file

    keep = tmp_path / "out"
    shutil.copytree(dirs["back"], keep)
    before = sorted((p.name, p.stat().st_size) for p in keep.iterdir())
    for change, message in ((lambda t: t.update({"foo.bar": torch.zeros(2)}), "tensor foo.bar has no place"),
                            (lambda t: t.pop("model.norm.weight"), "lacks 1 tensors the model needs")):
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(dirs["hf"], src)
        tensors = load_file(str(src / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(src / "model.safetensors"))
        with pytest.raises(SpQRError, match=message):
            import_hf_spqr(src, keep, overwrite=True)
        assert sorted((p.name, p.stat().st_size) for p in keep.iterdir()) == before



@pytest.mark.parametrize("perm", ["act_order", "identity"])
def test_round_trip_of_random_layers(perm: str, tmp_path: Path) -> None:
    """Random codes, statistics (any sign, so bit 63 of the second-level value is set) and outliers, including
    an all-outlier row and an empty one; without a permutation ``in_perm`` is empty."""
    q = build_quant_dir(tmp_path / "q", tiny_llama(), QuantConfig(perm=perm), outlier_fraction=0.05)
    pack_model(q, tmp_path / "p")
    export_hf_spqr(tmp_path / "p", tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    in_perm = tensors["model.layers.0.self_attn.q_proj.in_perm"]
    assert in_perm.numel() == (32 if perm == "act_order" else 0)
    import_hf_spqr(tmp_path / "hf", tmp_path / "back")
    a, _ = read_packed(tmp_path / "p")
    b, _ = read_packed(tmp_path / "back")
    for name, pw in a.items():
        assert set(pw.tensors) == set(b[name].tensors)
        assert all(same_bits(v, b[name].tensors[k]) for k, v in pw.tensors.items()), name
    name = "model.layers.1.mlp.down_proj"
    t = {k: tensors[f"{name}.{k}"] for k in ("dense_weights", "row_offsets", "col_vals", "in_perm")}
    assert same_bits(reference_decode(64, 128, t), QuantizedLayer.from_packed(a[name]).dequantize())


def to_ptcsr(row_offsets: torch.Tensor, col_vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's CSR sparse entries in the authors' PTCSR layout, written from its description (``spqr_quant``'s
    ``init_ptcsr`` and ``tensor_compress_interleaved``), plain Python: per block of 16 rows, as many lines of 16
    slots as the block's longest row has entries; the k-th entry of the block's row j in slot j of line k; empty
    slots 0; ``row_offsets`` one per block, ``[N / 16 + 1]``."""
    offsets, values = row_offsets.tolist(), col_vals.tolist()
    ptr, slots = [0], []
    for block in range(0, len(offsets) - 1, 16):
        rows = [values[offsets[r]:offsets[r + 1]] for r in range(block, block + 16)]
        lines = [[0] * 16 for _ in range(max(map(len, rows)))]
        for j, row in enumerate(rows):
            for k, value in enumerate(row):
                lines[k][j] = value
        slots += [value for line in lines for value in line]
        ptr.append(len(slots))
    return torch.tensor(ptr, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)


def _import_ptcsr_copy(hf: Path, root: Path) -> Path:
    """``hf`` (CSR, as we export) rewritten with every layer's entries in PTCSR, then imported; the packed
    directory."""
    import shutil

    from safetensors.torch import save_file

    src = root / "hf-ptcsr"
    shutil.copytree(hf, src)
    tensors = load_file(str(src / "model.safetensors"))
    padded = 0
    for name in [k.removesuffix(".row_offsets") for k in tensors if k.endswith(".row_offsets")]:
        csr = tensors[f"{name}.row_offsets"], tensors[f"{name}.col_vals"]
        tensors[f"{name}.row_offsets"], tensors[f"{name}.col_vals"] = to_ptcsr(*csr)
        assert tensors[f"{name}.row_offsets"].numel() == (csr[0].numel() - 1) // 16 + 1
        padded += tensors[f"{name}.col_vals"].numel() - csr[1].numel()
    assert padded > 0  # rows of one block hold different numbers of entries: zero slots are read past
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    import_hf_spqr(src, root / "back-ptcsr")
    return root / "back-ptcsr"


def _same_packed(a: Path, b: Path) -> None:
    a_layers, a_dense = read_packed(a)
    b_layers, b_dense = read_packed(b)
    assert set(a_layers) == set(b_layers) and set(a_dense) == set(b_dense)
    for name, pw in a_layers.items():
        assert pw.meta() == b_layers[name].meta() and set(pw.tensors) == set(b_layers[name].tensors), name
        assert all(same_bits(v, b_layers[name].tensors[k]) for k, v in pw.tensors.items()), name
    assert all(same_bits(v, b_dense[k]) for k, v in a_dense.items())


def test_import_reads_ptcsr_as_csr(dirs, tmp_path: Path) -> None:
    """The authors' PTCSR row layout imports to the same outliers (and everything else) as the CSR form: the real
    spqr-3.9bit model, whose residual entries come one or two to a position."""
    _same_packed(dirs["back"], _import_ptcsr_copy(dirs["hf"], tmp_path))


def test_import_reads_ptcsr_of_edge_rows(tmp_path: Path) -> None:
    """PTCSR with an all-outlier row (its block is as deep as the layer is wide) and empty rows."""
    q = build_quant_dir(tmp_path / "q", tiny_llama(), QuantConfig(perm="act_order"), outlier_fraction=0.05)
    pack_model(q, tmp_path / "p")
    export_hf_spqr(tmp_path / "p", tmp_path / "hf")
    _same_packed(tmp_path / "p", _import_ptcsr_copy(tmp_path / "hf", tmp_path))


def test_damaged_ptcsr_is_refused(tmp_path: Path) -> None:
    """A PTCSR block that is not whole lines of 16 slots would put every later entry in the wrong row: refused."""
    from spqr_cli.format.hf_spqr import HF_TENSORS, decode_layer

    q = build_quant_dir(tmp_path / "q", tiny_llama(), QuantConfig(perm="act_order"), outlier_fraction=0.05)
    pack_model(q, tmp_path / "p")
    export_hf_spqr(tmp_path / "p", tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    t = {k: tensors[f"{name}.{k}"] for k in HF_TENSORS}
    ptr, slots = to_ptcsr(t["row_offsets"], t["col_vals"])
    expected = QuantizedLayer.from_packed(read_packed(tmp_path / "p")[0][name]).dequantize()
    assert same_bits(decode_layer(name, 64, 64, {**t, "row_offsets": ptr, "col_vals": slots}).dequantize(), expected)
    ptr[1:] -= 1  # the first block loses a slot
    with pytest.raises(SpQRError, match="whole lines of 16"):
        decode_layer(name, 64, 64, {**t, "row_offsets": ptr, "col_vals": slots[1:]})
