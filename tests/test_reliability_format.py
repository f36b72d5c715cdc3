"""Issue 18, packed-format part: every bad input to pack/unpack/inspect/load ends in one ``error:`` line (exit 2)
or a clean ``SpQRError``, never a traceback, a silently wrong model or lost data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import spqr_cli.core.io as io
from spqr_cli.cli import app
from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import CONFIG_NAME, config_checksum, read_packed, tensor_sha256
from spqr_cli.format.pack import pack_model, unpack_model
from spqr_cli.runtime.loader import load_any_model, load_packed, model_kind

sys.path.insert(0, str(Path(__file__).parent))
from test_pack import _rewrite_config, build_quant_dir, tiny_llama  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}
# a layer with N=32 outputs: ceil(32/16) == ceil(32/17), so beta2 16 -> 17 keeps every shape
Q32 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def quant(tmp_path_factory) -> Path:
    q = build_quant_dir(tmp_path_factory.mktemp("rq") / "q", tiny_llama(hidden=32, layers=1, intermediate=64,
                                                                        vocab=64), QuantConfig())
    (q / "dense" / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    return q


@pytest.fixture(scope="module")
def packed(quant: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rp") / "packed"
    pack_model(quant, out, shard_size_mb=0.004)  # several shards
    return out


@pytest.fixture
def copy(packed: Path, tmp_path: Path) -> Path:
    d = tmp_path / "d"
    shutil.copytree(packed, d)
    return d


def _tokens() -> torch.Tensor:
    return torch.arange(8).reshape(1, 8) % 64


def _logits(d: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_packed(d, dtype=torch.float32).forward(_tokens()).logits


def cli(args: list[str]) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def assert_one_error(code: int, stderr: str, match: str = "") -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and match in lines[0], stderr


def _rewrite_tensor(d: Path, layer: str, tname: str, edit) -> None:
    """Edit one packed tensor in its shard, keeping the shard's header metadata, and fix the config's sha256 and
    checksum: what a careful forger would do."""
    cfg = json.loads((d / CONFIG_NAME).read_text())
    info = cfg["layers"][layer]["tensors"][tname]
    path = d / info["shard"]
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    key = f"{layer}.{tname}"
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, str(path), metadata=meta)
    info["sha256"] = tensor_sha256(tensors[key])
    cfg["checksum"] = config_checksum(cfg)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 1. packed tensors without spqr_config.json


def test_packed_dir_without_config_is_refused(copy: Path) -> None:
    (copy / CONFIG_NAME).unlink()
    with pytest.raises(SpQRError, match="no spqr_config.json"):
        model_kind(str(copy))
    with pytest.raises(SpQRError, match="no spqr_config.json"):
        load_any_model(str(copy), device="cpu")
    code, _, err = cli(["run", copy, "--prompt", "a", "--device", "cpu"])
    assert_one_error(code, err, "no spqr_config.json")


def test_plain_dense_dir_is_still_dense(quant: Path) -> None:
    assert model_kind(str(quant / "dense"))[0] == "dense"


# ---------------------------------------------------------------------------------------------------------------
# 2. config values validated against the tensors (checksum recomputed)


def test_beta2_edit_keeping_shapes_is_detected(copy: Path) -> None:
    cfg = json.loads((copy / CONFIG_NAME).read_text())
    assert cfg["layers"][Q32]["out_features"] == 32 and cfg["layers"][Q32]["beta2"] == 16
    _rewrite_config(copy, lambda c: c["layers"][Q32].update(beta2=17))
    with pytest.raises(SpQRError, match="differs from the copy in shard"):
        read_packed(copy)
    with pytest.raises(SpQRError, match="differs from the copy in shard"):
        read_packed(copy, verify=False)  # structure is always checked
    code, _, err = cli(["unpack", copy, "--out", copy.parent / "u"])
    assert_one_error(code, err, "re-pack")
    assert not (copy.parent / "u").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda p: torch.cat([p[:1], p[:-1]]), "not a permutation"),  # duplicate
    (lambda p: torch.cat([p[:-1], torch.tensor([-1], dtype=p.dtype)]), "not a permutation"),  # negative
    (lambda p: torch.cat([p[:-1], torch.tensor([p.numel()], dtype=p.dtype)]), "not a permutation"),  # == K
])
def test_bad_perm_is_refused(copy: Path, edit, match: str) -> None:
    _rewrite_tensor(copy, Q32, "perm", edit)
    with pytest.raises(SpQRError, match=match):
        read_packed(copy)


@pytest.mark.parametrize("value", [32, 4096, -1])  # K=32; -1 is 0xFFFF read as unsigned
def test_outlier_column_out_of_range_is_refused(copy: Path, value: int) -> None:
    cfg = json.loads((copy / CONFIG_NAME).read_text())
    layer = next(n for n, m in cfg["layers"].items() if m["nnz"] > 0)

    def edit(c: torch.Tensor) -> torch.Tensor:
        c[0] = value
        return c

    _rewrite_tensor(copy, layer, "outlier_col", edit)
    with pytest.raises(SpQRError, match="outlier column"):
        read_packed(copy)


def test_row_ptr_not_monotone_is_refused(copy: Path) -> None:
    cfg = json.loads((copy / CONFIG_NAME).read_text())
    layer = next(n for n, m in cfg["layers"].items() if m["nnz"] > 1)

    def edit(p: torch.Tensor) -> torch.Tensor:
        p[1:-1] = torch.flip(torch.sort(p[1:-1]).values, [0])
        if bool((p[1:] >= p[:-1]).all()):
            p[1] = p[-1]
            p[2] = 0
        return p

    _rewrite_tensor(copy, layer, "outlier_row_ptr", edit)
    with pytest.raises(SpQRError, match="row pointers"):
        read_packed(copy)


@pytest.mark.parametrize("field,value", [("beta2", 0), ("groupsize", 0), ("wbits", "3"), ("stat_bits", None),
                                         ("nnz", 1.5), ("has_perm", 1)])
def test_bad_meta_values_cli(copy: Path, field: str, value) -> None:
    _rewrite_config(copy, lambda c: c["layers"][Q32].update({field: value}))
    code, _, err = cli(["inspect", copy])
    assert_one_error(code, err, field)


# ---------------------------------------------------------------------------------------------------------------
# 3. coverage: a layer removed from the config


def test_removed_layer_is_refused(copy: Path) -> None:
    _rewrite_config(copy, lambda c: c["layers"].pop("model.layers.0.mlp.down_proj"))
    with pytest.raises(SpQRError, match="down_proj"):
        read_packed(copy)
    out = copy.parent / "u"
    code, _, err = cli(["unpack", copy, "--out", out])
    assert_one_error(code, err, "down_proj")
    assert not out.exists()
    _no_leftovers(copy.parent)


def test_removed_layer_is_refused_without_shard_headers(copy: Path) -> None:
    """A checkpoint from before the shard headers (legacy): the family adapter still catches the gap."""
    cfg = json.loads((copy / CONFIG_NAME).read_text())
    for shard in cfg["shards"]:
        with safe_open(str(copy / shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(copy / shard), metadata={"format": "pt"})
    read_packed(copy)  # legacy shards load
    _rewrite_config(copy, lambda c: c["layers"].pop("model.layers.0.mlp.down_proj"))
    with pytest.raises(SpQRError, match="lacks 1 linear layers"):
        read_packed(copy)


# ---------------------------------------------------------------------------------------------------------------
# 4. every copied model file is checksummed


def test_tokenizer_checksum(copy: Path) -> None:
    cfg = json.loads((copy / CONFIG_NAME).read_text())
    assert set(cfg["files_sha256"]) == {"tokenizer.json", "generation_config.json"}
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {"a": 1, "b": 0}  # swapped entries
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SpQRError, match="tokenizer.json fails its checksum"):
        read_packed(copy)
    read_packed(copy, verify=False)  # --no-verify skips it, as for tensors
    code, _, err = cli(["inspect", copy])
    assert_one_error(code, err, "tokenizer.json")
    code, _, err = cli(["unpack", copy, "--out", copy.parent / "u"])
    assert_one_error(code, err, "tokenizer.json")
    # the forger also fixes the table in spqr_config.json: the shard headers still disagree
    _rewrite_config(copy, lambda c: c["files_sha256"].update({"tokenizer.json": "0" * 64}))
    with pytest.raises(SpQRError, match="header of shard"):
        read_packed(copy, verify=False)


def test_missing_or_extra_model_file(copy: Path) -> None:
    (copy / "vocab.json").write_text("{}")
    with pytest.raises(SpQRError, match="vocab.json is not part"):
        read_packed(copy)
    (copy / "vocab.json").unlink()
    (copy / "tokenizer.json").unlink()
    with pytest.raises(SpQRError, match="tokenizer.json is missing"):
        read_packed(copy)


# ---------------------------------------------------------------------------------------------------------------
# 5. one writer per output, atomic swap, recovery after a kill


def test_lock_held_by_live_process(quant: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        io.lock_path(out).write_text(f"{sleeper.pid}\n")
        code, _, err = cli(["pack", quant, "--out", out])
        assert_one_error(code, err, "another spqr is writing")
        assert not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # now its pid is dead: the stale lock is taken over
    pack_model(quant, out)
    read_packed(out)
    _no_leftovers(tmp_path)


def test_two_concurrent_packs(quant: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spqr_cli", "pack", str(quant), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert_one_error(2, err)
    assert "another spqr is writing" in err or "not empty" in err
    read_packed(out)
    _no_leftovers(tmp_path)


def test_second_pack_keeps_user_files(quant: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack_model(quant, out)
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(["pack", quant, "--out", out])
    assert_one_error(code, err, "not empty")
    assert (out / "notes.txt").read_text() == "mine"
    read_packed(out)


def test_error_between_swap_renames_restores_old(quant: Path, packed: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    calls = []
    real = io._rename

    def flaky(src: Path, dst: Path) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # tmp -> out: the old one is already aside
            raise OSError(errno.EIO, "simulated I/O error")
        real(src, dst)

    monkeypatch.setattr(io, "_rename", flaky)
    with pytest.raises(SpQRError, match="simulated I/O error"):
        pack_model(quant, out, overwrite=True)
    monkeypatch.setattr(io, "_rename", real)
    read_packed(out)  # the old complete checkpoint is back
    _no_leftovers(tmp_path)


def test_kill_between_swap_renames_is_recovered(quant: Path, packed: Path, tmp_path: Path, monkeypatch) -> None:
    """A kill runs no handler: the name is empty, the old output intact beside it; the next run puts it back."""
    out = tmp_path / "out"
    shutil.copytree(packed, out)

    class Killed(BaseException):
        pass

    real = io._rename
    calls = []

    def killed(src: Path, dst: Path) -> None:
        calls.append(1)
        if len(calls) >= 2:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(io, "_rename", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # the kill also skips the cleanup
    monkeypatch.setattr(io.Path, "unlink", lambda *a, **k: None)
    with pytest.raises(Killed):
        pack_model(quant, out, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()
    (old,) = tmp_path.glob(".out.old-*")
    read_packed(old)  # nothing was deleted
    assert list(tmp_path.glob(".out.tmp-*")) and io.lock_path(out).exists()
    # the lock's pid is ours (alive): pretend the killed run was another, dead process
    io.lock_path(out).write_text("999999999\n")
    code, _, err = cli(["pack", quant, "--out", out])  # recovers the old one, then refuses to overwrite it
    assert_one_error(code, err, "not empty")
    read_packed(out)
    _no_leftovers(tmp_path)
    assert pack_model(quant, out, overwrite=True)["layers"] == 7
    read_packed(out)
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. file-system errors and damaged inputs: one line, exit 2, nothing half-written


def test_out_below_regular_file(quant: Path, packed: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["pack", quant, "--out", tmp_path / "file" / "out"])
    assert_one_error(code, err, "cannot write")
    code, _, err = cli(["unpack", packed, "--out", tmp_path / "file" / "out"])
    assert_one_error(code, err, "cannot write")
    code, _, err = cli(["inspect", packed, "--json", tmp_path / "file" / "r.json"])
    assert_one_error(code, err)


@pytest.mark.parametrize("err_no,match", [(errno.ENOSPC, "free some space"), (errno.EACCES, "permissions"),
                                          (errno.EROFS, "permissions")])
def test_disk_full_or_read_only(quant: Path, packed: Path, tmp_path: Path, monkeypatch, err_no: int,
                                match: str) -> None:
    """As root, chmod does not stop writes: the writer is made to fail as a full or read-only disk would."""
    from spqr_cli.format import pack

    def full(*a, **k):
        raise OSError(err_no, os.strerror(err_no))

    # the shard writer fails as a tensor's bytes are written, or as a full shard is copied into place
    for step in ("tensor_bytes", "copy_bytes"):
        monkeypatch.setattr(pack, step, full)
        for args in (["pack", quant, "--out", tmp_path / "p"], ["unpack", packed, "--out", tmp_path / "u"]):
            code, _, err = cli(args)
            assert_one_error(code, err, match)
            assert not (tmp_path / "p").exists() and not (tmp_path / "u").exists()
        monkeypatch.undo()
    monkeypatch.setattr(io, "write_json", full)
    code, _, err = cli(["inspect", packed, "--json", tmp_path / "r.json"])
    assert_one_error(code, err)
    _no_leftovers(tmp_path)


def test_truncated_dense_safetensors(quant: Path, tmp_path: Path) -> None:
    q = tmp_path / "q"
    shutil.copytree(quant, q)
    f = q / "dense" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-200])
    code, _, err = cli(["pack", q, "--out", tmp_path / "out"])
    assert_one_error(code, err, "re-run `spqr quantize`")
    assert not (tmp_path / "out").exists()
    f.write_bytes(b"\x01")
    code, _, err = cli(["pack", q, "--out", tmp_path / "out"])
    assert_one_error(code, err, "corrupted or truncated")


def test_truncated_packed_shard_cli(copy: Path) -> None:
    shard = copy / json.loads((copy / CONFIG_NAME).read_text())["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-50])
    for args in (["inspect", copy], ["unpack", copy, "--out", copy.parent / "u"]):
        code, _, err = cli(args)
        assert_one_error(code, err)


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, "[1, 2]", "null", '"x"', "{"])
def test_malformed_config_json(copy: Path, text: str) -> None:
    (copy / CONFIG_NAME).write_text(text)
    code, _, err = cli(["inspect", copy])
    assert_one_error(code, err, CONFIG_NAME)
    with pytest.raises(SpQRError):
        load_packed(copy)


# ---------------------------------------------------------------------------------------------------------------
# 7. permissions follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_umask(quant: Path, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "p"
        pack_model(quant, out)
        unpack_model(out, tmp_path / "u")
        io.write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    for d in (out, tmp_path / "u"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------------
# fuzz: every per-layer field edited with the checksum recomputed -> SpQRError or identical logits

META_FIELDS = ("out_features", "in_features", "wbits", "groupsize", "beta2", "stat_bits", "nnz", "has_perm")
BAD = ("zero", "minus1", "plus1", "huge", "string", "null")


def _bad(v, kind: str):
    return {"zero": 0, "minus1": -1, "plus1": (v + 1) if not isinstance(v, bool) else (not v), "huge": 2**62,
            "string": "16", "null": None}[kind]


def test_fuzz_config_values(packed: Path, tmp_path: Path) -> None:
    ref = _logits(packed)
    layers = list(json.loads((packed / CONFIG_NAME).read_text())["layers"])
    tried = clean = same = 0
    for field in META_FIELDS:
        for kind in BAD:
            for layer in (layers[0], Q32):
                d = tmp_path / f"{field}-{kind}-{layer}"
                shutil.copytree(packed, d)
                _rewrite_config(d, lambda c, f=field, k=kind, n=layer: c["layers"][n].update(
                    {f: _bad(c["layers"][n][f], k)}))
                tried += 1
                try:
                    logits = _logits(d)
                except SpQRError:
                    clean += 1
                else:  # only a harmless edit may load, and then it must be exact
                    assert torch.equal(logits, ref), (field, kind, layer)
                    same += 1
                for verify in (True, False):
                    with pytest.raises(SpQRError):
                        read_packed(d, verify=verify)
                shutil.rmtree(d)
    print(f"fuzz: {tried} edits, {clean} clean errors, {same} identical loads")
    assert same == 0 and clean == tried


def _table_edits(info: dict) -> list[tuple[str, object]]:
    other = "int8" if info["dtype"] != "int8" else "float16"
    return [("dtype", other), ("dtype", None), ("shape", [s + 1 for s in info["shape"]]), ("shape", "x"),
            ("shape", []), ("shard", "nope.safetensors"), ("shard", None), ("shard", "../x"), ("sha256", "0" * 64)]


def test_fuzz_tensor_table(packed: Path, tmp_path: Path) -> None:
    """Each tensor entry of one layer (and one dense tensor) edited, checksum recomputed: a clean error, or (only
    with --no-verify and a wrong sha256, the data itself unchanged) identical logits."""
    ref = _logits(packed)
    cfg = json.loads((packed / CONFIG_NAME).read_text())
    entries = [("layers", Q32, t) for t in cfg["layers"][Q32]["tensors"]]
    entries.append(("dense_tensors", "model.norm.weight", None))
    tried = clean = same = 0
    for i, (table, name, tname) in enumerate(entries):
        info = cfg[table][name] if tname is None else cfg[table][name]["tensors"][tname]
        for j, (key, value) in enumerate(_table_edits(info)):
            d = tmp_path / f"{i}-{j}"
            shutil.copytree(packed, d)

            def edit(c, table=table, name=name, tname=tname, key=key, value=value):
                entry = c[table][name] if tname is None else c[table][name]["tensors"][tname]
                entry[key] = value

            _rewrite_config(d, edit)
            for verify in (True, False):
                tried += 1
                try:
                    with torch.no_grad():
                        logits = load_packed(d, dtype=torch.float32, verify=verify).forward(_tokens()).logits
                except SpQRError:
                    clean += 1
                else:
                    assert not verify and key == "sha256", (table, name, tname, key, value)
                    assert torch.equal(logits, ref)
                    same += 1
            shutil.rmtree(d)
    print(f"table fuzz: {tried} loads, {clean} clean errors, {same} identical (--no-verify, sha256 only)")
    assert clean + same == tried
