"""Packed checkpoint: round trips, size accounting, and rejection of every kind of damage."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spqr_cli.console import render_inspect
from spqr_cli.core.config import QuantConfig, default_for_method
from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import CONFIG_NAME, PackedCheckpoint, config_checksum, read_packed
from spqr_cli.format.inspect import inspect_packed
from spqr_cli.format.pack import pack_model, unpack_model
from spqr_cli.quant.record import QuantizedLayer, load_records, save_records
from spqr_kernels.layout import formula_bits
from spqr_kernels.synthetic import random_packed

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_llama(hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 256, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                      vocab_size=vocab, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def build_quant_dir(root: Path, model, cfg: QuantConfig, outlier_fraction: float = 0.01) -> Path:
    """A QUANT_DIR as ``spqr quantize`` writes it, with ``random_record`` layers instead of real quantization.

    dense/ holds the model with every quantized linear replaced by its record's ``dequantize()``.
    """
    from spqr_cli.core.models import adapter_for

    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    names: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    (root / "records").mkdir()
    for b, block in enumerate(blocks):
        records = {}
        group_perm = {sub: names_[0] for names_ in adapter.sequential for sub in names_}
        for i, sub in enumerate(adapter.linear_names()):
            lin = block.get_submodule(sub)
            full = f"{adapter.blocks}.{b}.{sub}"
            rec = QuantizedLayer.from_packed(random_packed(lin.out_features, lin.in_features, wbits=cfg.wbits,
                                groupsize=cfg.group_size_for(lin.in_features), beta2=cfg.beta2,
                                stat_bits=cfg.stat_bits, outlier_fraction=outlier_fraction if cfg.has_outliers else 0,
                                act_order=cfg.perm == "act_order", seed=100 * b + i,
                                outlier_rows="edge" if i == 0 else "random"))
            leader = records.get(f"{adapter.blocks}.{b}.{group_perm[sub]}")
            if leader is not None and leader.perm is not None:  # siblings share act-order, as in real runs
                rec.perm = leader.perm.clone()
            with torch.no_grad():
                lin.weight.copy_(rec.dequantize().to(lin.weight.dtype))
            records[full] = rec
            names.append(full)
        save_records(str(root / "records" / f"block_{b:04d}.safetensors"), records)
    model.half().save_pretrained(root / "dense")
    model.float()
    (root / "quant_config.json").write_text(json.dumps({
        "format": "spqr-quant", "version": 1, "model": "tiny-random-llama", "family": adapter.name,
        "config": cfg.to_dict(), "calibration": {}, "num_blocks": len(blocks), "layers": names}))
    return root


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory) -> Path:
    return build_quant_dir(tmp_path_factory.mktemp("q") / "quant", tiny_llama(), QuantConfig())


@pytest.fixture(scope="module")
def packed_dir(quant_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p") / "packed"
    pack_model(quant_dir, out, shard_size_mb=0.02)  # ~20 KB shards: exercises multi-shard writing
    return out


def dense_state(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_pack_layout_and_copied_files(packed_dir: Path, quant_dir: Path) -> None:
    cfg = json.loads((packed_dir / CONFIG_NAME).read_text())
    assert cfg["format"] == "spqr-packed" and cfg["format_version"] == 1
    assert cfg["quant_config"] == QuantConfig().to_dict()
    assert len(cfg["shards"]) > 1 and all((packed_dir / s).is_file() for s in cfg["shards"])
    assert cfg["shards"][0] == f"model-00001-of-{len(cfg['shards']):05d}.safetensors"
    model_cfg = json.loads((packed_dir / "config.json").read_text())  # the model's config + transformers' entry
    assert model_cfg.pop("quantization_config")["quant_method"] == "spqr-cli"
    assert model_cfg == json.loads((quant_dir / "dense" / "config.json").read_text())
    assert "lm_head.weight" not in cfg["dense_tensors"]  # tied: stored once
    assert "model.embed_tokens.weight" in cfg["dense_tensors"]
    assert len(cfg["layers"]) == 2 * 7
    assert not list(packed_dir.parent.glob(".packed.tmp-*"))
    # every layer's packed tensors equal record.pack() exactly
    layers, _ = read_packed(packed_dir)
    for path in sorted((quant_dir / "records").glob("*.safetensors")):
        for name, rec in load_records(str(path)).items():
            ref = rec.pack()
            assert set(layers[name].tensors) == set(ref.tensors)
            for t, v in ref.tensors.items():
                assert torch.equal(layers[name].tensors[t], v), (name, t)


def test_unpack_is_bit_exact_and_loads_in_transformers(packed_dir: Path, quant_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    unpack_model(packed_dir, out)
    ref, got = dense_state(quant_dir / "dense"), dense_state(out)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k].view(torch.int16), ref[k].view(torch.int16)), k
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_unpack_multi_shard_index(packed_dir: Path, quant_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    unpack_model(packed_dir, out, shard_size_mb=0.02)
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    ref = dense_state(quant_dir / "dense")
    sd = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_gptq_style_layers_round_trip(tmp_path: Path) -> None:
    """fp16 first-level stats, no permutation, no outliers (GPTQ/RTN special cases) take the other layout path."""
    cfg = default_for_method("gptq").replace(groupsize=64, perm="identity")
    q = build_quant_dir(tmp_path / "q", tiny_llama(seed=1), cfg)
    pack_model(q, tmp_path / "p")
    layers, _ = read_packed(tmp_path / "p")
    assert all("scales" in pw.tensors and "perm" not in pw.tensors for pw in layers.values())
    unpack_model(tmp_path / "p", tmp_path / "d")
    ref, got = dense_state(q / "dense"), dense_state(tmp_path / "d")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_inspect_sizes_match_disk(packed_dir: Path, quant_dir: Path) -> None:
    res = inspect_packed(packed_dir)
    t = res["totals"]
    assert res["checksums"] == "ok" and not res["failed"]
    cfg = json.loads((packed_dir / CONFIG_NAME).read_text())
    assert t["disk_bytes"] == sum((packed_dir / s).stat().st_size for s in cfg["shards"])
    recs = {}
    for path in sorted((quant_dir / "records").glob("*.safetensors")):
        recs.update(load_records(str(path)))
    by_name = {r["name"]: r for r in res["layers"]}
    q_bytes = 0
    for name, rec in recs.items():
        nbytes = rec.pack().nbytes()
        q_bytes += nbytes
        assert by_name[name]["bytes"] == nbytes
        assert by_name[name]["bits_measured"] == pytest.approx(8 * nbytes / (rec.out_features * rec.in_features))
        assert by_name[name]["bits_formula"] == pytest.approx(rec.formula_bits())
        assert by_name[name]["nnz"] == rec.nnz
    assert t["quantized_bytes"] == q_bytes
    model_params = sum(p.numel() for p in tiny_llama().parameters())  # tied embedding counted once
    assert t["total_params"] == model_params
    assert t["bits_per_param"] == pytest.approx(8 * t["disk_bytes"] / model_params)
    assert t["compression_ratio"] == pytest.approx(2 * model_params / t["disk_bytes"])
    # the whole file is tensors + one small header per shard
    header_bytes = t["disk_bytes"] - q_bytes - t["dense_bytes"]
    assert 0 < header_bytes < 20_000 * len(cfg["shards"])


def test_formula_bits_matches_record() -> None:
    """The record, its packed form and the formula written out by hand agree (one formula, three callers)."""
    for kw in (dict(wbits=3, stat_bits=3), dict(wbits=4, stat_bits=16, beta2=0, act_order=False)):
        pw = random_packed(48, 64, outlier_fraction=0.02, **kw)
        rec = QuantizedLayer.from_packed(pw)
        stats = 32 / 16 if pw.stat_bits == 16 else 2 * 3 / 16 + 2 * 2 * 16 / (16 * 16)
        by_hand = pw.wbits + stats + 32 * pw.nnz / (48 * 64) + (32 / 48 if "perm" in pw.tensors else 0)
        assert rec.formula_bits() == pytest.approx(by_hand) == pw.formula_bits()
        assert formula_bits(pw.wbits, pw.groupsize, pw.beta2, pw.stat_bits, 48, pw.nnz / (48 * 64),
                            "perm" in pw.tensors) == pytest.approx(by_hand)


def test_render_inspect_and_json(packed_dir: Path) -> None:
    from rich.console import Console

    res = inspect_packed(packed_dir, verify=False)
    assert res["checksums"] == "skipped"
    console = Console(record=True, width=200)
    render_inspect(res, console)
    text = console.export_text()
    assert "model.layers.1.mlp.down_proj" in text and "compression vs fp16" in text
    json.dumps(res)  # --json output is plain JSON


def test_refuses_to_overwrite(quant_dir: Path, packed_dir: Path) -> None:
    with pytest.raises(SpQRError, match="not empty"):
        pack_model(quant_dir, packed_dir)


def test_output_may_not_overlap_the_input(quant_dir: Path, packed_dir: Path) -> None:
    for out in (quant_dir, quant_dir / "packed"):  # --overwrite would otherwise delete the input
        with pytest.raises(SpQRError, match="overlaps the input"):
            pack_model(quant_dir, out, overwrite=True)
    with pytest.raises(SpQRError, match="overlaps the input"):
        unpack_model(packed_dir, packed_dir, overwrite=True)
    assert (quant_dir / "quant_config.json").is_file() and (packed_dir / "spqr_config.json").is_file()


def test_incomplete_quant_dir(quant_dir: Path, tmp_path: Path) -> None:
    q = tmp_path / "q"
    shutil.copytree(quant_dir, q)
    (q / "records" / "block_0001.safetensors").unlink()
    with pytest.raises(SpQRError, match="no record"):
        pack_model(q, tmp_path / "p")
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))


# --- corruption -------------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(packed_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "damaged"
    shutil.copytree(packed_dir, d)
    return d


def _rewrite_config(d: Path, edit) -> None:
    cfg = json.loads((d / CONFIG_NAME).read_text())
    edit(cfg)
    cfg["checksum"] = config_checksum(cfg)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _shard_of(d: Path, tensor: str) -> Path:
    cfg = json.loads((d / CONFIG_NAME).read_text())
    layer, _, t = tensor.rpartition(".")
    return d / cfg["layers"][layer]["tensors"][t]["shard"]


def _rewrite_shard(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


QW = "model.layers.0.self_attn.q_proj.qweight"


def test_truncated_shard(damaged: Path) -> None:
    shard = _shard_of(damaged, QW)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(SpQRError, match="corrupted or truncated"):
        read_packed(damaged)


def test_flipped_byte_in_data(damaged: Path) -> None:
    col = QW.replace("qweight", "outlier_col")
    shard = _shard_of(damaged, col)
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_len])[col]["data_offsets"]
    assert end - start >= 2
    data[8 + header_len + start + 1] ^= 0x10  # the high byte of the first outlier's column: +4096
    shard.write_bytes(bytes(data))
    with pytest.raises(SpQRError, match="checksum mismatch"):
        read_packed(damaged)
    # --no-verify skips the checksums, not the range checks: this byte sits in an outlier column, which now points
    # past the layer's inputs (an out-of-bounds read on the GPU), so it is still refused
    with pytest.raises(SpQRError, match="outlier column"):
        read_packed(damaged, verify=False)


def test_wrong_format_version(damaged: Path) -> None:
    _rewrite_config(damaged, lambda c: c.update(format_version=2))
    with pytest.raises(SpQRError, match="format version 2"):
        read_packed(damaged)


def test_edited_config_fails_its_checksum(damaged: Path) -> None:
    cfg = json.loads((damaged / CONFIG_NAME).read_text())
    cfg["layers"]["model.layers.0.mlp.up_proj"]["nnz"] += 1
    (damaged / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(SpQRError, match="checksum"):
        read_packed(damaged)


def test_missing_tensor(damaged: Path) -> None:
    _rewrite_shard(_shard_of(damaged, QW), lambda t: t.pop(QW))
    with pytest.raises(SpQRError, match="missing"):
        read_packed(damaged)


def test_missing_shard(damaged: Path) -> None:
    _shard_of(damaged, QW).unlink()
    with pytest.raises(SpQRError, match="missing"):
        PackedCheckpoint(damaged)


def test_shape_mismatch_tensor(damaged: Path) -> None:
    def edit(t):
        t[QW] = t[QW][:-1].clone()

    _rewrite_shard(_shard_of(damaged, QW), edit)
    with pytest.raises(SpQRError, match="expected int32"):
        read_packed(damaged, verify=False)


def test_shape_mismatch_meta(damaged: Path) -> None:
    _rewrite_config(damaged, lambda c: c["layers"]["model.layers.0.self_attn.q_proj"].update(out_features=32))
    with pytest.raises(SpQRError, match="does not match the layer metadata"):
        read_packed(damaged)


def test_packed_dir_from_another_model(damaged: Path) -> None:
    cfg = json.loads((damaged / "config.json").read_text())
    cfg["hidden_size"] = 96
    (damaged / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpQRError, match="hidden_size"):
        PackedCheckpoint(damaged)


def test_not_a_packed_dir(quant_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpQRError, match="spqr pack"):
        PackedCheckpoint(tmp_path / "nope")
    with pytest.raises(SpQRError, match="not found"):
        PackedCheckpoint(quant_dir)


def test_fuzz_flipped_bytes(tmp_path: Path) -> None:
    """200 copies with one random byte changed anywhere in the checksummed files: rejected or identical."""
    q = build_quant_dir(tmp_path / "q", tiny_llama(hidden=32, layers=1, intermediate=64, vocab=64), QuantConfig())
    src = tmp_path / "p"
    pack_model(q, src)
    ref_layers, ref_dense = read_packed(src)
    files = [src / CONFIG_NAME, src / "config.json"] + sorted(src.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    rng = random.Random(0)
    rejected = 0
    work = tmp_path / "w"
    shutil.copytree(src, work)
    for _ in range(200):
        i = rng.choices(range(len(files)), weights=sizes)[0]
        target = work / files[i].name
        original = files[i].read_bytes()
        data = bytearray(original)
        pos = rng.randrange(len(data)) if rng.random() < 0.7 else rng.randrange(min(len(data), 2048))  # headers
        data[pos] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(data))
        try:
            layers, dense = read_packed(work)
        except SpQRError:
            rejected += 1
        else:
            assert set(layers) == set(ref_layers) and set(dense) == set(ref_dense)
            for name, pw in layers.items():
                assert pw.meta() == ref_layers[name].meta()
                assert all(torch.equal(v, ref_layers[name].tensors[k]) for k, v in pw.tensors.items())
            assert all(torch.equal(v, ref_dense[k]) for k, v in dense.items())
        target.write_bytes(original)
    assert rejected > 150, rejected


@pytest.mark.skipif(not (SHARED / "models" / "docs-llama-3m").is_dir(), reason="shared models not available")
def test_real_docs_llama_3m(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHARED / "models" / "docs-llama-3m", dtype=torch.float32)
    q = build_quant_dir(tmp_path / "q", model, QuantConfig(), outlier_fraction=0.005)
    pack_model(q, tmp_path / "p")
    unpack_model(tmp_path / "p", tmp_path / "d")
    ref, got = dense_state(q / "dense"), dense_state(tmp_path / "d")
    assert set(ref) == set(got) and all(torch.equal(got[k], ref[k]) for k in ref)
    t = inspect_packed(tmp_path / "p")["totals"]
    # 3.85 bits of codes + stats, plus perm (32/N), CSR row pointers (32/K) and 0.5 % outliers: large on 128-wide
    assert 4.3 < t["quantized_bits_measured"] < 4.7
    assert t["compression_ratio"] > 1.3  # the 8192x128 fp16 embedding is half of this model


def _shard_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_quantize_pack_writes_no_dense_copy_and_packs_the_same(quantized_demo, demo_model_path, tmp_path, one_thread):
    """`spqr quantize --pack` (issue 21): no dense/ (only the unquantized tensors and the model files), and the packed
    checkpoint has exactly the tensors and layer metadata of `spqr quantize` + `spqr pack` on the same inputs."""
    from typer.testing import CliRunner

    from spqr_cli.cli import app
    from spqr_cli.demo import DEMO_CALIB
    from spqr_cli.runtime.loader import model_kind

    runner = CliRunner()
    quant, packed = tmp_path / "quant", tmp_path / "packed"
    args = ["quantize", str(demo_model_path), "--out", str(quant), "--dataset", f"file:{DEMO_CALIB}", "--nsamples",
            "4", "--seqlen", "64", "--device", "cpu", "--pack", str(packed)]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"wrote {packed}" in result.output
    assert not (quant / "dense").exists() and (quant / "unquantized" / "config.json").is_file()
    linears = json.loads((quant / "quant_config.json").read_text())["layers"]
    stored = _shard_tensors(quant / "unquantized")
    assert not {f"{n}.weight" for n in linears} & set(stored)  # no quantized weight is written dense
    dense = _shard_tensors(quantized_demo["quant"] / "dense")
    assert all(torch.equal(t, dense[k]) for k, t in stored.items())
    assert set(dense) - set(stored) == {f"{n}.weight" for n in linears}

    ours, theirs = _shard_tensors(packed), _shard_tensors(quantized_demo["packed"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    layers = [json.loads((d / CONFIG_NAME).read_text())["layers"] for d in (packed, quantized_demo["packed"])]
    assert json.dumps(layers[0], sort_keys=True) == json.dumps(layers[1], sort_keys=True)

    with pytest.raises(SpQRError, match="without a dense copy"):  # nothing to evaluate in QUANT_DIR itself
        model_kind(str(quant))
    again = runner.invoke(app, args, terminal_width=200)  # the finished run, packed again into its own output
    assert again.exit_code == 0 and "already holds this finished run" in again.output, again.output
    dense_again = runner.invoke(app, [*args[:-2], "--dense"], terminal_width=200)
    assert dense_again.exit_code == 2 and "without a dense copy" in dense_again.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    refused = runner.invoke(app, [*args[:-1], str(tmp_path / "other")], terminal_width=200)
    assert refused.exit_code == 2 and "is not a packed checkpoint" in refused.output
    (tmp_path / "other" / "spqr_config.json").write_text("[" * 100000)  # damaged beyond the JSON parser's depth
    refused = runner.invoke(app, [*args[:-1], str(tmp_path / "other")], terminal_width=200)
    assert refused.exit_code == 2 and "is not a packed checkpoint" in refused.output
    # refused before quantizing: a pack of another config, a --pack that overlaps --out (either way)
    other_cfg = runner.invoke(app, [*args, "--wbits", "4"], terminal_width=200)
    assert other_cfg.exit_code == 2 and "another model or config" in other_cfg.output
    for pack in (quant / "p", quant.parent):
        overlap = runner.invoke(app, [*args[:-1], str(pack)], terminal_width=200)
        assert overlap.exit_code == 2 and "overlap" in overlap.output, overlap.output
    # a finished run with a dense copy, re-run with --pack: keeps its dense copy and packs
    dense_run = tmp_path / "dense_run"
    shutil.copytree(quantized_demo["quant"], dense_run)
    with_pack = runner.invoke(app, [*args[:3], str(dense_run), *args[4:-1], str(tmp_path / "packed2")],
                              terminal_width=200)
    assert with_pack.exit_code == 0 and (dense_run / "dense").is_dir(), with_pack.output
    assert _shard_tensors(tmp_path / "packed2").keys() == theirs.keys()


def test_shard_writer_files_read_back_with_safetensors(tmp_path: Path) -> None:
    """The streamed shards (written tensor by tensor, not through save_file) are safetensors files: the library
    reads back every tensor bit for bit (each dtype, 0-d, empty, non-contiguous) and the header metadata, and a
    size cap splits them into several shards in the order added."""
    from spqr_cli.format.pack import ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f16": torch.randn(3, 5, generator=g).half(), "a.bf16": torch.randn(7, generator=g).bfloat16(),
        "b.f32": torch.randn(4, 4, generator=g).t(), "b.f64": torch.randn(2, generator=g).double(),
        "c.u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "c.i8": torch.randint(-128, 127, (3, 3), generator=g, dtype=torch.int8),
        "c.i16": torch.randint(-999, 999, (5,), generator=g, dtype=torch.int16),
        "c.i32": torch.randint(-2**30, 2**30, (6,), generator=g, dtype=torch.int32),
        "c.i64": torch.randint(-2**40, 2**40, (2, 1), generator=g, dtype=torch.int64),
        "d.bool": torch.rand(11, generator=g) > 0.5, "d.scalar": torch.tensor(3.5), "d.empty": torch.zeros(0, 4),
    }
    writer = ShardWriter(tmp_path, shard_size_mb=100 / 2**20, files_sha256={"config.json": "0" * 64})
    for name, t in tensors.items():
        writer.add(name, t, layer=name.split(".")[0], layer_meta={"bits": 3})
    with pytest.raises(SpQRError, match="written twice"):
        writer.add("a.f16", tensors["a.f16"])
    with pytest.raises(SpQRError, match="does not store"):
        writer.add("e.complex", torch.zeros(2, dtype=torch.complex64))
    shard_of = writer.close()
    assert len(set(shard_of.values())) > 2 and not list(tmp_path.glob(".shard-*"))
    for name, t in tensors.items():
        path = tmp_path / shard_of[name]
        back = load_file(path)[name]
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), name
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and name.split(".")[0] in json.loads(meta["spqr_layers"])
    one = ShardWriter(tmp_path / "one", shard_size_mb=1)  # every dtype in one shard
    (tmp_path / "one").mkdir()
    for name, t in tensors.items():
        one.add(name, t)
    assert set(one.close().values()) == {"model.safetensors"}
    back = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    for path in [*tmp_path.glob("*.safetensors"), tmp_path / "one" / "model.safetensors"]:
        raw = path.read_bytes()  # every tensor starts aligned to its element size, as save_file writes them
        header_len = int.from_bytes(raw[:8], "little")
        for name, info in json.loads(raw[8 : 8 + header_len]).items():
            if name != "__metadata__":
                assert (8 + header_len + info["data_offsets"][0]) % tensors[name].element_size() == 0, name
