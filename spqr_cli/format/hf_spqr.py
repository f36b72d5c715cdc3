"""The authors' / transformers' SpQR checkpoint format (``quant_method: "spqr"``): ``spqr export --to hf-spqr`` and
``spqr import``.

transformers loads it with ``SpQRHfQuantizer`` and the ``spqr_quant`` CUDA kernels; it is what the authors
publish. It only holds w3 layers with 3-bit statistics in 16x16 tiles (beta1 = beta2 = 16) and no bias, so
``export`` refuses anything else with one error naming the first layer that does not fit. Per quantized linear
``<m>`` of shape ``(N, K)`` (``docs/format.md`` has the full mapping):

- ``<m>.dense_weights`` int64 ``[N * K / 16]``: one 64-bit word per tile row. Tile ``(t, g)`` covers output rows
  ``16t .. 16t+15`` and *permuted* input columns ``16g .. 16g+15``; row ``r`` of it is word
  ``t * K + 16 g + r``. Bits: ``[0, 3)`` scale code, ``[3, 6)`` zero code, ``[6 + 3i, 9 + 3i)`` the code of column
  ``16g + i``, ``[54, 62)`` byte ``r // 2`` of the tile's second-level statistics: four fp16 numbers in one
  little-endian 64-bit value, (scale of the scale quantizer, scale of the zero quantizer, zero of the scale
  quantizer, zero of the zero quantizer); bits 62-63 are 0.
- ``<m>.row_offsets`` int32 ``[N + 1]`` (CSR; the authors' optional PTCSR ``[N / 16 + 1]`` is read on import),
- ``<m>.col_vals`` int32 ``[E]``: ``fp16 bits << 16 | column`` with the column in *permuted* space. The value is
  *added* to the dense weight (ours replaces it), so each of our outliers ``v`` (``d`` our fp16 dense weight
  there) becomes the residual ``hi = fp16(v - d)`` when ``d + hi`` rounds to ``v`` (and is an fp32 number), else
  two entries, ``hi`` and its rounding error (an fp16 number: the two-sum property), with ``d + hi + lo == v``
  exactly (about 4% of the outliers of a real spqr-3.9bit model);
- ``<m>.in_perm`` int32 ``[K / 2]``: the permutation as uint16 pairs (element ``2i`` in the low half), or ``[0]``
  for none.

Decoding in the format's terms gives our fp16 weights bit for bit when the arithmetic is ours (statistics and
weights in fp32, rounded once; see ``tests/test_hf_spqr.py``'s decoder). The authors' CUDA kernels compute the
statistics and weights in fp16 arithmetic, so their weights can differ from ours in the last bits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import SHARD_INDEX, chmod_like_open, read_json, write_shard_index
from spqr_cli.core.streaming import CheckpointWeights
from spqr_cli.format.checkpoint import DEFAULT_SHARD_MB, MODEL_FILES, PackedCheckpoint, file_sha256, tensor_info
from spqr_cli.format.pack import (
    ShardWriter,
    add_packed_layer,
    finish_packed,
    output_dir,
)
from spqr_cli.quant.record import QuantizedLayer

AUTHORS_METHOD = "spqr"
TILE = 16
BITS = 3
HF_TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm")
FITS = "hf-spqr holds 3-bit codes, 3-bit statistics, 16x16 tiles (groupsize = beta2 = 16) and no bias"


# ---------------------------------------------------------------------------------------------------------------
# one layer


def misfit(meta: dict[str, Any], has_bias: bool) -> str | None:
    """Why a layer cannot be written as hf-spqr (``None``: it fits)."""
    n, k = meta["out_features"], meta["in_features"]
    for key, want in (("wbits", BITS), ("stat_bits", BITS), ("groupsize", TILE), ("beta2", TILE)):
        if meta[key] != want:
            return f"{key}={meta[key]} (needs {want})"
    if n % TILE or k % TILE:
        return f"shape {n}x{k} (both must be multiples of {TILE})"
    if k > 32768:
        return f"in_features={k} (the kernels' outlier columns are signed 16-bit: at most 32768)"
    if has_bias:
        return "a bias"
    return None


def _fp16_bits(t: torch.Tensor) -> torch.Tensor:
    """fp16 values as their 16-bit patterns, int64 in [0, 65536)."""
    return t.to(torch.float16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16)


def encode_layer(rec: QuantizedLayer) -> dict[str, torch.Tensor]:
    """Our layer (must fit, see ``misfit``) as the four hf-spqr tensors."""
    n, k = rec.out_features, rec.in_features
    g, nt = k // TILE, n // TILE
    codes = rec.codes.view(n, g, TILE)
    words = rec.scale_codes.to(torch.int64) | (rec.zero_codes.to(torch.int64) << 3)  # [N, G]
    for i in range(TILE):  # one column of every tile at a time: int64 temporaries of [N, G], not [N, K]
        words |= codes[:, :, i].to(torch.int64) << (6 + 3 * i)
    ss, zs = rec.scale_stats, rec.zero_stats  # [NT, G, 2] fp16: (scale, zero) of each second-level quantizer
    second = (_fp16_bits(ss[..., 0]) | (_fp16_bits(zs[..., 0]) << 16) | (_fp16_bits(ss[..., 1]) << 32)
              | (_fp16_bits(zs[..., 1]) << 48))  # [NT, G]; bit 63 may be set: shifts below stay in int64 bits
    rows = torch.arange(n) % TILE
    byte = (second.repeat_interleave(TILE, dim=0) >> (8 * (rows // 2)).view(n, 1)) & 0xFF  # [N, G]
    words |= byte << 54
    dense_weights = words.view(nt, TILE, g).permute(0, 2, 1).reshape(-1).contiguous()

    inv = torch.arange(k) if rec.perm is None else torch.argsort(rec.perm)
    row_ptr = rec.outlier_row_ptr.to(torch.int64)
    counts = row_ptr[1:] - row_ptr[:-1]
    out_rows = torch.repeat_interleave(torch.arange(n), counts)
    cols = inv[rec.outlier_col.to(torch.int64)]  # permuted space
    hi, lo, two = _residuals(rec.outlier_val, _dense_at(rec, out_rows, cols))
    entries_row = torch.cat([out_rows, out_rows[two]])
    entries_col = torch.cat([cols, cols[two]])
    entries_val = torch.cat([hi, lo[two]])
    order = torch.argsort(entries_row * (k + 1) + entries_col, stable=True)
    entries_row, entries_col, entries_val = entries_row[order], entries_col[order], entries_val[order]
    col_vals = (_fp16_bits(entries_val) << 16) | entries_col
    row_offsets = torch.zeros(n + 1, dtype=torch.int64)
    row_offsets[1:] = torch.cumsum(torch.bincount(entries_row, minlength=n), 0)
    if rec.perm is None:
        in_perm = torch.zeros(0, dtype=torch.int32)
    else:
        p = rec.perm.to(torch.int64)
        in_perm = _as_int32(p[0::2] | (p[1::2] << 16))
    return {"dense_weights": dense_weights, "row_offsets": row_offsets.to(torch.int32),
            "col_vals": _as_int32(col_vals), "in_perm": in_perm}


def _residuals(v: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 entries whose sum with the dense weight ``d`` is the outlier ``v``: ``(hi, lo, two)``.

    One entry ``hi = fp16(v - d)`` where ``d + hi`` is an fp32 number that rounds to ``v`` (so summing in fp32 or
    exactly, then rounding to fp16, as the authors' dequantization and our import do, gives ``v``); elsewhere
    (``two``) a second entry ``lo = (v - d) - hi``, the rounding error of ``hi``, which is an fp16 number
    (two-sum), so ``d + hi + lo == v`` exactly.
    """
    d64, v64 = d.double(), v.double()
    diff = v64 - d64  # exact: both operands are fp16
    hi = diff.to(torch.float16)
    total = d64 + hi.double()  # exact as well
    single = (total.float().double() == total) & (total.float().to(torch.float16) == v)
    lo = (diff - hi.double()).to(torch.float16)
    two = ~single & (lo != 0)
    if not (torch.isfinite(hi).all() and torch.equal((d64 + hi.double() + torch.where(two, lo, 0).double())
                                                     .float().to(torch.float16), v)):
        raise SpQRError("an outlier cannot be stored as fp16 residuals (out of range); it does not fit hf-spqr")
    return hi, lo, two


def _dense_at(rec: QuantizedLayer, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp16 dense weights (outliers not applied) at (row, permuted column) positions: the entries of
    ``rec.dequantize_permuted()`` rounded to fp16, by the same fp32 operations, without the whole ``[N, K]``."""
    s, z = rec.stats_fp32()
    groups = cols // rec.groupsize
    return (s[rows, groups] * (rec.codes[rows, cols].float() - z[rows, groups])).to(torch.float16)


def _as_int32(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) stored as int32 bit patterns."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def decode_layer(name: str, n: int, k: int, t: dict[str, torch.Tensor]) -> QuantizedLayer:
    """The four hf-spqr tensors of one ``(N, K)`` layer as our ``QuantizedLayer`` (inverse of ``encode_layer``)."""
    g, nt = k // TILE, n // TILE
    dw, ro = t["dense_weights"], t["row_offsets"]
    if dw.dtype != torch.int64 or dw.numel() != n * k // TILE:
        raise SpQRError(f"layer {name}: dense_weights is {dw.dtype}[{dw.numel()}], expected int64[{n * k // TILE}] "
                        f"for a {n}x{k} layer")
    words = dw.view(nt, g, TILE).permute(0, 2, 1).reshape(n, g)
    codes = torch.stack([((words >> (6 + 3 * i)) & 7).to(torch.uint8) for i in range(TILE)], dim=2).reshape(n, k)
    byte = (words >> 54) & 0xFF
    even, odd = byte.view(nt, 8, 2, g).unbind(dim=2)  # rows 2j and 2j + 1 both carry byte j
    if not torch.equal(even, odd):
        raise SpQRError(f"layer {name}: the rows of a tile disagree on its second-level statistics; the checkpoint "
                        "is damaged")
    second = torch.zeros(nt, g, dtype=torch.int64)
    for j in range(8):
        second |= even[:, j] << (8 * j)
    ss = torch.stack([_fp16_from_bits(second), _fp16_from_bits(second >> 32)], dim=-1)
    zs = torch.stack([_fp16_from_bits(second >> 16), _fp16_from_bits(second >> 48)], dim=-1)
    perm = _decode_perm(name, k, t["in_perm"])
    rec = QuantizedLayer(out_features=n, in_features=k, wbits=BITS, groupsize=TILE, beta2=TILE, stat_bits=BITS,
                         codes=codes, scale_codes=(words & 7).to(torch.uint8),
                         zero_codes=((words >> 3) & 7).to(torch.uint8), scale_stats=ss, zero_stats=zs, perm=perm,
                         outlier_row_ptr=torch.zeros(n + 1, dtype=torch.int32),
                         outlier_col=torch.zeros(0, dtype=torch.int32),
                         outlier_val=torch.zeros(0, dtype=torch.float16))
    rows, cols, vals = _decode_entries(name, n, k, ro, t["col_vals"])
    if rows.numel():
        # one outlier per (row, column): our value = dense weight + the sum of that position's residuals
        key = rows * k + cols
        uniq, inverse = torch.unique(key, return_inverse=True)
        total = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, vals.double())
        urows, ucols = uniq // k, uniq % k
        d16 = _dense_at(rec, urows, ucols).double()
        values = (d16 + total).float().to(torch.float16)  # rounded through fp32, as the authors' dequantize
        orig = ucols if perm is None else perm[ucols]
        order = torch.argsort(urows * k + orig)
        urows, orig, values = urows[order], orig[order], values[order]
        rec.outlier_row_ptr[1:] = torch.cumsum(torch.bincount(urows, minlength=n), 0).to(torch.int32)
        rec.outlier_col, rec.outlier_val = orig.to(torch.int32), values
    return rec


def _decode_perm(name: str, k: int, in_perm: torch.Tensor) -> torch.Tensor | None:
    if in_perm.numel() == 0:
        return None
    if in_perm.dtype != torch.int32 or in_perm.numel() != k // 2:
        raise SpQRError(f"layer {name}: in_perm is {in_perm.dtype}[{in_perm.numel()}], expected int32[{k // 2}]")
    w = in_perm.to(torch.int64) & 0xFFFFFFFF
    perm = torch.stack([w & 0xFFFF, w >> 16], dim=1).reshape(-1)
    if not torch.equal(torch.sort(perm).values, torch.arange(k)):
        raise SpQRError(f"layer {name}: in_perm is not a permutation of 0..{k - 1}; the checkpoint is damaged")
    return perm


def _decode_entries(name: str, n: int, k: int, ro: torch.Tensor,
                    col_vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, permuted column, fp16 value) of every sparse entry, CSR or the authors' PTCSR."""
    if col_vals.numel() == 0:
        return (torch.zeros(0, dtype=torch.int64),) * 2 + (torch.zeros(0, dtype=torch.float16),)
    if col_vals.dtype != torch.int32 or ro.dtype != torch.int32:
        raise SpQRError(f"layer {name}: row_offsets/col_vals must be int32, got {ro.dtype}/{col_vals.dtype}")
    ptr = ro.to(torch.int64)
    e = col_vals.numel()
    if ptr.numel() == 0 or int(ptr[0]) != 0 or int(ptr[-1]) != e or bool((ptr[1:] < ptr[:-1]).any()):
        raise SpQRError(f"layer {name}: row_offsets are inconsistent with {e} col_vals; the checkpoint is damaged")
    cv = col_vals.to(torch.int64) & 0xFFFFFFFF
    if ptr.numel() == n + 1:  # CSR
        rows = torch.repeat_interleave(torch.arange(n), ptr[1:] - ptr[:-1])
        keep = torch.ones(e, dtype=torch.bool)
    elif ptr.numel() == n // TILE + 1:  # PTCSR: per 16-row block, entries interleaved by row; zero words pad
        if bool(((ptr[1:] - ptr[:-1]) % TILE).any()):  # the rows below come from each slot's place in its line
            raise SpQRError(f"layer {name}: PTCSR row_offsets must step by whole lines of {TILE} entries; the "
                            "checkpoint is damaged")
        block = torch.repeat_interleave(torch.arange(n // TILE), ptr[1:] - ptr[:-1])
        rows = block * TILE + torch.arange(e) % TILE
        keep = cv != 0
    else:
        raise SpQRError(f"layer {name}: row_offsets has {ptr.numel()} entries, expected {n + 1} (CSR) or "
                        f"{n // TILE + 1} (PTCSR)")
    cols = cv & 0xFFFF
    if bool((cols[keep] >= k).any()):
        raise SpQRError(f"layer {name}: a sparse column is >= in_features {k}; the checkpoint is damaged")
    return rows[keep], cols[keep], _fp16_from_bits(cv >> 16)[keep]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _bar(show: bool, label: str) -> Any:
    """The progress display over the layers (``core/progress``; silent unless ``show``)."""
    from spqr_cli.core.progress import eta_progress

    return eta_progress(f"[bold]{label}[/] {{task.description}}", "layers", enabled=show)


def _skeleton(model_config: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """The model ``config.json`` describes, on the meta device: every ``nn.Linear`` as name -> (out_features,
    in_features), and the names of all its saved tensors (``state_dict``), to check a checkpoint's coverage."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in model_config.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(**plain)
    except (ValueError, TypeError, KeyError) as e:
        raise SpQRError(f"config.json does not describe a transformers model ({e})") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return linears, set(model.state_dict())


def export_hf_spqr(packed_dir: str | Path, out_dir: str | Path, verify: bool = True, overwrite: bool = False,
                   shard_size_mb: int = DEFAULT_SHARD_MB, progress: bool = False) -> dict[str, Any]:
    """Write the transformers/authors SpQR checkpoint of a packed model; return a summary.

    Every layer is checked first: a model that does not fit gets one ``SpQRError`` naming the first layer that
    does not and why, before anything is written.
    """
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    try:
        for name, meta in ckpt.layers.items():
            why = misfit(meta, f"{name}.bias" in ckpt.dense)
            if why is not None:
                raise SpQRError(f"{packed_dir} does not fit the hf-spqr format: layer {name} has {why}; {FITS}")
        linears, _ = _skeleton(ckpt.model_config)
        not_converted = sorted(set(linears) - set(ckpt.layers))
        shapes: dict[str, int] = {}
        with output_dir(Path(out_dir), overwrite, ckpt.path) as tmp:
            writer = ShardWriter(tmp, shard_size_mb)
            with _bar(progress, "export") as bar:
                task = bar.add_task("layers", total=len(ckpt.layers))
                for name, pw in ckpt.iter_layers():
                    for tname, t in encode_layer(QuantizedLayer.from_packed(pw)).items():
                        writer.add(f"{name}.{tname}", t)
                        shapes[f"{name}.{tname}.shape"] = t.numel()
                    bar.advance(task)
            for name in ckpt.dense:
                writer.add(name, ckpt.load_dense(name))
            shard_of = writer.close()
            files = write_shard_index(tmp, shard_of, {"total_size": writer.total_bytes})
            config = {k: v for k, v in ckpt.model_config.items() if k != "quantization_config"}
            # module names (transformers 5 matches them) and their ".weight" (what the authors' converter writes and
            # transformers 4 matches): each form matches nothing in the other version
            skip = sorted([*not_converted, *(f"{m}.weight" for m in not_converted)])
            config["quantization_config"] = {"quant_method": AUTHORS_METHOD, "bits": BITS, "beta1": TILE,
                                             "beta2": TILE, "shapes": shapes, "modules_to_not_convert": skip}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for fname in MODEL_FILES[1:]:
                if (ckpt.path / fname).is_file():
                    shutil.copyfile(ckpt.path / fname, tmp / fname)
            for f in tmp.iterdir():
                chmod_like_open(f)
    finally:
        ckpt.close()
    return {"out_dir": str(out_dir), "layers": len(ckpt.layers), "modules_to_not_convert": not_converted,
            "shards": files}


def import_hf_spqr(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                   shard_size_mb: int = DEFAULT_SHARD_MB, progress: bool = False) -> dict[str, Any]:
    """Read a transformers/authors SpQR checkpoint (``quant_method: "spqr"``) into our packed format."""
    from types import SimpleNamespace

    from spqr_cli.core.models import adapter_for

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model_config = read_json(hf_dir / "config.json", "transformers SpQR checkpoint")
    qc = model_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != AUTHORS_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise SpQRError(f"{hf_dir}/config.json is not a transformers SpQR checkpoint (quant_method {method!r}, "
                        f"expected {AUTHORS_METHOD!r}); `spqr import` reads what `spqr export --to hf-spqr` writes")
    for key, want in (("bits", BITS), ("beta1", TILE), ("beta2", TILE)):
        if qc.get(key, want) != want:
            raise SpQRError(f"{hf_dir}: {key}={qc.get(key)!r}; transformers SpQR checkpoints have {key}={want}")
    if not ((hf_dir / "model.safetensors").is_file() or (hf_dir / SHARD_INDEX).is_file()):
        raise SpQRError(f"{hf_dir} holds no model.safetensors (or {SHARD_INDEX}); `spqr import` reads safetensors")
    family = adapter_for(SimpleNamespace(model_type=model_config.get("model_type"))).name
    source = CheckpointWeights(hf_dir, name=str(hf_dir), fix="copy the checkpoint again")
    linears, expected = _skeleton(model_config)
    quantized = sorted({k.rsplit(".", 1)[0] for k in source.file_of if k.endswith(".dense_weights")})
    unknown = [q for q in quantized if q not in linears]
    if unknown:
        raise SpQRError(f"{hf_dir}: quantized layer {unknown[0]} is not a linear layer of the model config.json "
                        "describes")
    # every tensor has a place in the model and every place a tensor (else the import would not load)
    present = {f"{q}.weight" for q in quantized} | {
        t for t in source.file_of if not (t.rpartition(".")[0] in quantized and t.rpartition(".")[2] in HF_TENSORS)}
    if bool(model_config.get("tie_word_embeddings", False)):
        present.add("lm_head.weight")
    stray, missing = sorted(present - expected), sorted(expected - present)
    if stray:
        raise SpQRError(f"{hf_dir}: tensor {stray[0]} has no place in the model its config.json describes "
                        f"({len(stray)} such); the checkpoint is not for this model")
    if missing:
        raise SpQRError(f"{hf_dir} lacks {len(missing)} tensors the model needs (first: {missing[0]}); the "
                        "checkpoint is incomplete: copy it again")
    plain = {k: v for k, v in model_config.items() if k != "quantization_config"}
    all_files = {f: file_sha256(hf_dir / f) for f in MODEL_FILES if (hf_dir / f).is_file()}
    files = {f: h for f, h in all_files.items() if f != "config.json"}
    with output_dir(out_dir, overwrite, hf_dir) as tmp:
        writer = ShardWriter(tmp, shard_size_mb, files_sha256=files)
        layers: dict[str, dict[str, Any]] = {}
        with _bar(progress, "import") as bar:
            task = bar.add_task("layers", total=len(quantized))
            for name in quantized:
                tensors = {}
                for t in HF_TENSORS:
                    if f"{name}.{t}" not in source.file_of:
                        raise SpQRError(f"{hf_dir}: layer {name} has no {t} tensor; the checkpoint is incomplete")
                    tensors[t] = source.get(f"{name}.{t}")
                n, k = linears[name]
                if n % TILE or k % TILE:
                    raise SpQRError(f"{hf_dir}: layer {name} is {n}x{k}, not a multiple of {TILE}x{TILE} tiles")
                layers[name] = add_packed_layer(name, decode_layer(name, n, k, tensors).pack(), writer)
                bar.advance(task)
        tied = bool(plain.get("tie_word_embeddings", False))
        dense_meta: dict[str, dict[str, Any]] = {}
        for tname in sorted(source.file_of):
            module, _, leaf = tname.rpartition(".")
            if (module in layers and leaf in HF_TENSORS) or (tied and tname == "lm_head.weight"):
                continue  # converted above, or tied to the input embedding
            t = source.get(tname)
            if t.is_floating_point():
                t = t.to(torch.float16)
            dense_meta[tname] = tensor_info(t)
            writer.add(tname, t)
        quant_config = {"method": "spqr", "wbits": BITS, "groupsize": TILE, "beta2": TILE, "stat_bits": BITS,
                        "imported_from": "hf-spqr"}
        finish_packed(tmp, writer, hf_dir, plain, all_files, layers, dense_meta,
                      {"source_model": str(hf_dir), "family": family, "quant_config": quant_config})
        try:  # the reader's structural checks, before the result replaces anything at out_dir
            PackedCheckpoint(tmp, verify=False).close()
        except SpQRError as e:
            raise SpQRError(f"{hf_dir} does not import into a loadable packed checkpoint ({e})") from None
    return {"out_dir": str(out_dir), "layers": len(layers), "dense_tensors": len(dense_meta)}
