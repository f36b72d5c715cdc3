"""Issue 21, streamed weights: ``spqr quantize`` reads each block from the safetensors shards when it needs it.

The streamed driver must give exactly what the whole-model driver gave (records and dense/ bit-identical): the
reference here loads the whole model with ``load_model`` and runs the driver's per-block steps on it, as the driver
did before streaming. Host memory must not grow with depth: peak RSS of a 2-block and an 8-block random model of
the same width, each quantized in its own process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from spqr_cli.core.config import load_preset
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.models import adapter_for, check_checkpoint, empty_model, load_model, tied_weight_names
from spqr_cli.core.streaming import CheckpointWeights, StreamedCheckpointWriter
from spqr_cli.quant import driver
from spqr_cli.quant.record import save_records

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
DOCS_3M = SHARED_MODELS / "docs-llama-3m"
sys.path.insert(0, str(REPO / "benchmarks"))
from make_random_llama import write_random_llama  # noqa: E402

pytestmark = [pytest.mark.skipif(not DOCS_3M.is_dir(), reason="../shared/models/docs-llama-3m not available"),
              pytest.mark.usefixtures("one_thread")]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _calib(n: int = 4, seqlen: int = 64, vocab: int = 8000) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def full_load_quantize(model_path: str, cfg, calib: torch.Tensor, out: Path) -> dict[str, torch.Tensor]:
    """The driver before streaming: the whole fp16 model in host memory (``load_model``), each block moved to the
    compute dtype, quantized, run, moved back with its dequantized weights. Writes the records to
    ``out/records.safetensors``; returns the final fp16 state dict (what dense/ held, tied weights left out)."""
    model = load_model(model_path, dtype="fp16", device="cpu")
    adapter = adapter_for(model)
    dev, dtype = torch.device("cpu"), torch.float32
    inps, kwargs = driver._block_inputs(model, adapter, calib, dev, dtype)
    report, records = driver.QuantReport(), {}
    for i, block in enumerate(adapter.get_blocks(model)):
        prefix = f"{adapter.blocks}.{i}"
        block.to(device=dev, dtype=dtype)
        recs = driver._quantize_block(block, prefix, adapter, inps, kwargs, cfg, dev, dtype, 8, report,
                                      lambda _d: None)
        inps = driver._run_block(block, inps, kwargs, dev, dtype, 8)
        block.to(device="cpu", dtype=torch.float16)
        for name in adapter.linear_names():
            block.get_submodule(name).weight.data = recs[f"{prefix}.{name}"].dequantize()
        records.update(recs)
    out.mkdir(parents=True, exist_ok=True)
    save_records(str(out / "records.safetensors"), records)
    tied = tied_weight_names(model)
    return {k: v.to(torch.float16) for k, v in model.state_dict().items() if k not in tied}


def streamed_records(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((out / "records").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def dense_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_streamed_quantize_is_bit_identical_to_full_load(tmp_path: Path) -> None:
    """docs-llama-3m (tied embeddings), SpQR with outliers and act-order: records, dense/ tensors and config."""
    cfg, calib = load_preset("spqr-3.9bit"), _calib()
    ref_dense = full_load_quantize(str(DOCS_3M), cfg, calib, tmp_path / "ref")
    seen: list[tuple[str, int, int, str]] = []
    out = tmp_path / "streamed"
    driver.quantize_model(str(DOCS_3M), cfg, out, calib, device="cpu", progress=lambda *a: seen.append(a))
    assert_same(load_file(str(tmp_path / "ref" / "records.safetensors")), streamed_records(out))
    assert_same(ref_dense, dense_tensors(out / "dense"))
    assert "lm_head.weight" not in ref_dense  # tied: stored once, as save_pretrained does
    saved = json.loads((out / "dense" / "config.json").read_text())
    assert saved["dtype"] == "float16" and saved["architectures"] == ["LlamaForCausalLM"]
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == {
        k: v for k, v in json.loads((DOCS_3M / "config.json").read_text()).items() if k != "transformers_version"}
    # progress: block i/N, the stage and the host memory in every update
    assert {s[0] for s in seen} == {"quantize"} and all(s[2] == 4 for s in seen)
    assert [s[1] for s in seen if s[3].startswith("block") and " done" in s[3]] == [1, 2, 3, 4]
    assert all(" · host " in s[3] and s[3].endswith(" MB") for s in seen)


FAMILIES = {
    "mistral": lambda c: c.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                         max_position_embeddings=128, tie_word_embeddings=False),
    "qwen2": lambda c: c.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                     max_position_embeddings=128),
    "opt": lambda c: c.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=8192, max_position_embeddings=128, word_embed_proj_dim=64),
    "falcon": lambda c: c.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=8192,
                                       max_position_embeddings=128),
}


def tiny_model(family: str, directory: Path) -> Path:
    """A random fp16 model of ``family`` saved by transformers, with docs-llama-3m's tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](transformers)).half()
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DOCS_3M / name, directory / name)
    return directory


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_streams_like_full_load(family: str, tmp_path: Path) -> None:
    model = tiny_model(family, tmp_path / family)
    cfg, calib = load_preset("spqr-3.9bit"), _calib(2, 32)
    ref_dense = full_load_quantize(str(model), cfg, calib, tmp_path / "ref")
    driver.quantize_model(str(model), cfg, tmp_path / "q", calib, device="cpu")
    assert_same(load_file(str(tmp_path / "ref" / "records.safetensors")), streamed_records(tmp_path / "q"))
    assert_same(ref_dense, dense_tensors(tmp_path / "q" / "dense"))


def test_checks_read_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing, unexpected and mis-shaped weights are found without reading a tensor; a prefix-less checkpoint
    (OPT's ``decoder.*`` for ``model.decoder.*``) is accepted."""
    from safetensors.torch import save_file

    model = empty_model(str(DOCS_3M))
    monkeypatch.setattr(CheckpointWeights, "read", lambda *_a, **_k: pytest.fail("a tensor was read"))
    check_checkpoint(model, CheckpointWeights(DOCS_3M), str(DOCS_3M))  # the real checkpoint passes
    tensors = load_file(str(DOCS_3M / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"][:, :-1].clone()
    del tensors["model.norm.weight"]
    tensors["model.layers.7.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SpQRError) as exc:
        check_checkpoint(model, CheckpointWeights(bad), "bad")
    assert str(exc.value) == ("the weights of 'bad' do not match its config.json: 1 missing (first: model.norm.weight)"
                              "; 1 unexpected (first: model.layers.7.extra.weight); 1 mismatched (first: "
                              "model.layers.2.mlp.up_proj.weight); the checkpoint is incomplete or belongs to "
                              "another model")
    opt = tiny_model("opt", tmp_path / "opt")
    stripped = {k.removeprefix("model."): v for k, v in load_file(str(opt / "model.safetensors")).items()}
    save_file(stripped, str(opt / "model.safetensors"), metadata={"format": "pt"})
    weights = CheckpointWeights(opt)
    check_checkpoint(empty_model(str(opt)), weights, str(opt))
    assert weights.resolve("model.decoder.layers.0.fc1.weight") == "decoder.layers.0.fc1.weight"


def test_sharded_index_errors(tmp_path: Path) -> None:
    model = write_random_llama(tmp_path / "m", hidden=64, intermediate=128, layers=3, heads=4, shard_mb=0.05,
                               tokenizer_from=DOCS_3M)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    weights = CheckpointWeights(model)
    assert set(weights.headers) == set(index["weight_map"])
    (model / shards[1]).unlink()
    with pytest.raises(SpQRError, match=f"{shards[1]}.*missing or damaged"):
        CheckpointWeights(model)


def test_writer_streams_any_order_and_shards(tmp_path: Path) -> None:
    """The dense writer: tensors written out of order land where the header says, in shards with an index."""
    tensors = {f"t{i}": torch.randn(64, 33 + i, generator=torch.Generator().manual_seed(i)).half() for i in range(5)}
    tensors["ids"] = torch.arange(7)
    writer = StreamedCheckpointWriter(tmp_path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                                      max_shard_bytes=2 * 64 * 40 * 2)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    assert len(writer.files) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert_same(tensors, dense_tensors(tmp_path))


def _quantize_in_process(model: Path, out: Path, env: dict[str, str] | None = None,
                         extra: tuple[str, ...] = ()) -> tuple[int, float, str]:
    """``spqr quantize`` in its own process: (exit code, its peak RSS in MB from ``wait4``, stderr)."""
    from spqr_cli.demo import DEMO_CALIB

    cmd = [sys.executable, "-m", "spqr_cli", "quantize", str(model), "--out", str(out), "--dataset",
           f"file:{DEMO_CALIB}", "--nsamples", "2", "--seqlen", "64", "--device", "cpu", "--method", "rtn", *extra]
    with open(out.with_suffix(".err"), "w+b") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})},
                                cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024.0, text


def test_peak_host_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    """2 vs 8 blocks of width 1024 (26 MB of fp16 weights per block; the 8-block model holds 154 MB more),
    quantized and packed (``--pack``: the shard writer holds one tensor, not a shard): the deep run's peak RSS is
    within 15% (+32 MB) of the shallow one's. Loading the whole model, as before, measured
    779 -> 1016 MB here (+30%); streamed, 624-650 -> 634-687 MB over several runs (+1-6%)."""
    peaks = {}
    for layers in (2, 8):
        model = write_random_llama(tmp_path / f"m{layers}", hidden=1024, intermediate=2816, layers=layers, heads=16,
                                   shard_mb=60, tokenizer_from=DOCS_3M)
        code, peak, err = _quantize_in_process(model, tmp_path / f"q{layers}",
                                               extra=("--pack", str(tmp_path / f"p{layers}")))
        assert code == 0, err[-2000:]
        peaks[layers] = peak
        assert json.loads((tmp_path / f"q{layers}" / "report.json").read_text())["peak_host_mb"] <= peak + 1
    print(f"peak RSS: 2 blocks {peaks[2]:.0f} MB, 8 blocks {peaks[8]:.0f} MB")
    assert peaks[8] <= 1.15 * peaks[2] + 32, peaks


def test_hub_id_reads_the_local_snapshot(tmp_path: Path) -> None:
    """A hub id resolves to its cached snapshot offline (HF_HUB_OFFLINE=1) and is quantized from its shards; an
    id that is not cached stays a one-line error."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(DOCS_3M, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code, _, err = _quantize_in_process(Path("org/tiny"), tmp_path / "hub_run", env)
    assert code == 0, err[-2000:]
    state = json.loads((tmp_path / "hub_run" / "quant_config.json").read_text())
    assert state["model"] == "org/tiny" and state["complete"] and len(streamed_records(tmp_path / "hub_run")) > 0
    dense, source = dense_tensors(tmp_path / "hub_run" / "dense"), load_file(str(DOCS_3M / "model.safetensors"))
    kept = [k for k in source if not any(k.startswith(f"{layer}.") for layer in state["layers"])]
    assert kept and all(torch.equal(dense[k], source[k]) for k in kept)  # read from the snapshot's shards
    code, _, err = _quantize_in_process(Path("org/absent"), tmp_path / "absent", env)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot load model config 'org/absent'")


# ------------------------------------------------------------------ eval / run of a model larger than the device

DOCS_17M = SHARED_MODELS / "docs-llama-17m"
WIKI_TEST = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def test_memory_limits_cap_the_gpu_then_host_then_disk() -> None:
    """What accelerate gets on a GPU machine: the chosen GPU capped, the host next (its free memory unless capped);
    a GPU cap on the CPU and sizes that are not sizes are one-line errors before anything loads."""
    from spqr_cli.runtime.loader import memory_limits

    assert memory_limits(torch.device("cpu")) is None
    limits = memory_limits(torch.device("cuda:1"), "8GiB")
    assert set(limits) == {1, "cpu"} and limits[1] == 8 * 2**30 and limits["cpu"] > 2**28
    assert memory_limits(torch.device("cuda:0"), "500MB", "2GiB") == {0: 500 * 10**6, "cpu": 2 * 2**30}
    assert memory_limits(torch.device("cpu"), None, "0") == {"cpu": 0}
    with pytest.raises(SpQRError, match="--max-gpu-memory caps a CUDA GPU but the device is cpu"):
        memory_limits(torch.device("cpu"), "8GiB")
    with pytest.raises(SpQRError, match="--max-cpu-memory 'lots' is not a size"):
        memory_limits(torch.device("cpu"), None, "lots")


@pytest.mark.skipif(not (DOCS_17M.is_dir() and WIKI_TEST.is_file()), reason="../shared 17m model or wikitext2")
def test_eval_under_a_tiny_cap_matches_plain_eval() -> None:
    """docs-llama-17m (68 MB as fp32 on the CPU): with the host capped at 0 bytes every weight is offloaded to disk,
    at 40 MB the embeddings and the first blocks stay in host memory and the rest on disk; the perplexity is the
    plain CPU eval's."""
    from spqr_cli.core.evaluate import evaluate_path, evaluate_perplexity
    from spqr_cli.runtime.loader import load_any_model

    kw = {"dataset": f"file:{WIKI_TEST}", "seqlen": 128, "max_windows": 2}
    plain = evaluate_path(str(DOCS_17M), device="cpu", **kw)
    assert plain.device == "cpu" and plain.windows == 2
    for cap, places in (("0", {"disk"}), ("40MB", {"cpu", "disk"})):
        model, tokenizer = load_any_model(str(DOCS_17M), device="cpu", max_cpu_memory=cap)
        assert set(model.hf_device_map.values()) == places, model.hf_device_map
        capped = evaluate_perplexity(model, tokenizer, **kw)
        assert capped.device == "cpu+disk" and capped.nll == pytest.approx(plain.nll, rel=1e-6), cap


def test_packed_model_and_run_under_a_cap(quantized_demo) -> None:
    """A packed checkpoint placed by accelerate (SpQRLinear's packed buffers offloaded to disk) gives the plain
    load's perplexity, and `spqr run` under a cap generates the same greedy text."""
    from typer.testing import CliRunner

    from spqr_cli.cli import app
    from spqr_cli.core.evaluate import evaluate_path
    from spqr_cli.demo import DEMO_CALIB

    kw = {"dataset": f"file:{DEMO_CALIB}", "device": "cpu", "seqlen": 64, "max_windows": 2}
    plain = evaluate_path(str(quantized_demo["packed"]), **kw)
    capped = evaluate_path(str(quantized_demo["packed"]), max_cpu_memory="0", **kw)
    assert capped.device == "cpu+disk" and capped.nll == pytest.approx(plain.nll, rel=1e-6)
    runner = CliRunner()
    args = ["run", str(quantized_demo["packed"]), "--prompt", "The", "--max-new-tokens", "6", "--device", "cpu"]
    a, b = runner.invoke(app, args), runner.invoke(app, [*args, "--max-cpu-memory", "0"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.stdout == b.stdout and a.stdout.strip()
    bad = runner.invoke(app, [*args, "--max-gpu-memory", "8GiB"])
    assert bad.exit_code == 2 and "error: --max-gpu-memory caps a CUDA GPU" in bad.stderr


# ------------------------------------------------------------------------------ several ranks (gloo on the CPU)

RANK_WORKER = """
import sys, torch
torch.set_num_threads(1)
from spqr_cli.core.config import load_preset
from spqr_cli.quant.driver import quantize_model
ids = torch.randint(3, 8000, (8, 32), generator=torch.Generator().manual_seed(0))
preset = sys.argv[3] if len(sys.argv) > 3 else "spqr-3.9bit"
report = quantize_model(sys.argv[1], load_preset(preset), sys.argv[2], ids, device="cpu", forward_batch=2)
import torch.distributed as dist
print(f"rank {dist.get_rank()} of {dist.get_world_size()}, resumed from {report.resumed_from_block}")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(model: Path, out: Path, *extra: str, ok: bool = True) -> list[str]:
    """Quantize with 2 processes launched as torchrun would (RANK, WORLD_SIZE, MASTER_*); their stdout lines
    (``ok=False``: their stderr, after checking that both failed)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_WORKER, str(model), str(out), *extra], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    if not ok:
        assert all(p.returncode != 0 for p in procs)
        return [e.decode(errors="replace") for _, e in outputs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode(errors="replace")[-3000:] for _, e in outputs]
    return [o.decode().strip() for o, _ in outputs]


def test_two_gloo_ranks_are_bit_identical_to_one_process(tmp_path: Path) -> None:
    """2 gloo ranks each run 2 of the 4 forward batches and complete the Hessians rank to rank in window order, and
    quantize their share of each group's layers: records, dense/ and the report's errors equal one process's, bit
    for bit; a run resumed under 2 ranks too."""
    one = tmp_path / "one"
    driver.quantize_model(str(DOCS_3M), load_preset("spqr-3.9bit"), one,
                          torch.randint(3, 8000, (8, 32), generator=torch.Generator().manual_seed(0)), device="cpu",
                          forward_batch=2)
    two = tmp_path / "two"
    assert _two_ranks(DOCS_3M, two) == ["rank 0 of 2, resumed from 0", "rank 1 of 2, resumed from 0"]
    assert_same(streamed_records(one), streamed_records(two))
    assert_same(dense_tensors(one / "dense"), dense_tensors(two / "dense"))
    a, b = (json.loads((d / "report.json").read_text())["layers"] for d in (one, two))
    assert [r["rel_error"] for r in a] == [r["rel_error"] for r in b]
    # the layers of a block are spread over the ranks round robin (q, v, gate, down on rank 0; k, o, up on rank 1)
    assert {r["rank"] for r in a} == {0}
    assert [r["rank"] for r in b[:7]] == [0, 1, 0, 1, 0, 1, 0], [r["name"] for r in b[:7]]
    # an interrupted run (blocks 0-1 committed) resumed by 2 ranks: replayed, then quantized together
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed, ignore=shutil.ignore_patterns("dense", "report.json", "block_0002.*", "block_0003.*"))
    state = json.loads((resumed / "quant_config.json").read_text())
    (resumed / "quant_config.json").write_text(json.dumps({**state, "completed_blocks": 2, "complete": False}))
    assert _two_ranks(DOCS_3M, resumed)[0] == "rank 0 of 2, resumed from 2"
    assert_same(streamed_records(one), streamed_records(resumed))
    assert_same(dense_tensors(one / "dense"), dense_tensors(resumed / "dense"))
    # an error of a step only rank 0 takes (the output holds another config) stops both ranks, none waits
    errors = _two_ranks(DOCS_3M, two, "rtn-4bit-g128", ok=False)
    assert all("holds a run with a different config" in e.strip().splitlines()[-1] for e in errors), errors


def test_ranks_split_whole_forward_batches() -> None:
    from spqr_cli.quant.ranks import Ranks, window_share

    assert [window_share(10, 3, Ranks(r, 2)) for r in range(2)] == [slice(0, 6), slice(6, 10)]
    assert [window_share(8, 2, Ranks(r, 3)) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 8)]
    with pytest.raises(SpQRError, match="fewer than the 4 ranks"):
        window_share(4, 2, Ranks(0, 4))


def test_block_outputs_overwrite_their_inputs_batch_by_batch() -> None:
    """``_run_block`` writes each forward batch's outputs over its inputs (one activation buffer for the run): the
    same values as outputs written to a separate buffer, for a block that mixes the positions of a sample."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    class Mix(nn.Module):  # mixes positions within a sample (as attention does), never across samples
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return block(x + x.mean(dim=1, keepdim=True))

    inps = torch.randn(5, 4, 6)
    separate = driver._run_block(Mix(), inps, {}, torch.device("cpu"), torch.float32, 2, torch.empty_like(inps))
    assert driver._run_block(Mix(), inps, {}, torch.device("cpu"), torch.float32, 2) is inps
    assert torch.equal(inps, separate)


def test_activations_stay_in_host_memory_on_cpu() -> None:
    placed, where, line = driver.place_activations(torch.Size((2, 8, 16)), torch.float32, torch.device("cpu"))
    assert placed.device.type == "cpu" and placed.shape == (2, 8, 16) and placed.dtype == torch.float32
    assert where == "host" and line == "activations (0.00 GB) in host memory"
    with pytest.raises(SpQRError, match="activations must be one of auto, device, host, disk"):
        driver.place_activations(torch.Size((2, 8, 16)), torch.float32, torch.device("cpu"), "tape")
    with pytest.raises(SpQRError, match="--activations device needs a GPU run"):
        driver.place_activations(torch.Size((2, 8, 16)), torch.float32, torch.device("cpu"), "device")


def test_activations_device_on_a_cpu_run_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(SpQRError, match="--activations device needs a GPU run"):
        driver.quantize_model(str(DOCS_3M), load_preset("spqr-3.9bit"), tmp_path / "q", _calib(), device="cpu",
                              activations="device")
    assert not (tmp_path / "q").exists()


def test_activations_on_disk_give_the_same_records_and_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    """``--activations disk`` (and "auto" when host memory is short) keeps them in an unlinked file under
    --offload-dir: the records equal a run with them in host memory, the report says where, no file is left; a
    disk without room is a one-line error before any block."""
    cfg, calib = load_preset("spqr-3.9bit").replace(clip_grid=0), _calib()
    host = driver.quantize_model(str(DOCS_3M), cfg, tmp_path / "host", calib, device="cpu", dense=False)
    disk = driver.quantize_model(str(DOCS_3M), cfg, tmp_path / "disk", calib, device="cpu", dense=False,
                                 activations="disk", offload_dir=tmp_path / "spill")
    assert "in host memory" in host.activations
    assert f"on disk in {tmp_path / 'spill'} (--activations disk)" in disk.activations
    assert_same(streamed_records(tmp_path / "host"), streamed_records(tmp_path / "disk"))
    assert list((tmp_path / "spill").iterdir()) == []
    monkeypatch.setattr(driver, "available_host_bytes", lambda: 2**10)  # auto: not even host memory fits
    buffer, where, line = driver.place_activations(torch.Size((2, 8, 16)), torch.float32, torch.device("cpu"),
                                                   offload_dir=tmp_path / "spill")
    assert where == "disk" and "too large for host memory (0.0 GB available)" in line
    buffer.fill_(3.0)
    assert buffer.sum().item() == 3.0 * 256 and list((tmp_path / "spill").iterdir()) == []

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SpQRError, match="cannot reserve .*No space left on device.*--offload-dir"):
        driver.place_activations(torch.Size((2, 8, 16)), torch.float32, torch.device("cpu"), "disk",
                                 offload_dir=tmp_path / "spill")
    assert list((tmp_path / "spill").iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_activation_placement_does_not_change_the_records(tmp_path: Path, monkeypatch) -> None:
    """Activations on the GPU, in pinned host memory (also when too large for the GPU: a GPU with 64 KB free) or
    on disk give the same records, and the report says where they were."""
    cfg, calib = load_preset("spqr-3.9bit"), _calib()
    reports = {}
    for where in ("device", "host", "disk"):
        reports[where] = driver.quantize_model(str(DOCS_3M), cfg, tmp_path / where, calib, device="cuda",
                                               activations=where, dense=False)
    assert "on the GPU" in reports["device"].activations and "pinned" in reports["host"].activations
    assert "on disk" in reports["disk"].activations
    assert_same(streamed_records(tmp_path / "device"), streamed_records(tmp_path / "host"))
    assert_same(streamed_records(tmp_path / "device"), streamed_records(tmp_path / "disk"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**16, 2**30))
    placed, _, line = driver.place_activations(torch.Size((4, 64, 256)), torch.float16, torch.device("cuda"))
    assert placed.is_pinned() and "pinned host memory (too large for the GPU)" in line
    placed, _, line = driver.place_activations(torch.Size((3, 5, 7)), torch.float16, torch.device("cuda"), "host")
    assert placed.is_pinned() and "pinned host memory (--activations host)" in line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_buffers_are_page_locked_at_their_own_size() -> None:
    """``pinned_empty`` registers a large ordinary allocation (torch's pinned allocator would round 2.5 GB up to
    4): the tensor is page-locked, copies both ways, and is unregistered when it dies (registering the same range
    again would fail if it were not). Small buffers come from torch's pinned allocator."""
    import gc

    from spqr_cli.core.streaming import PIN_REGISTER_MIN, _clear_cuda_error, pinned_empty

    small = pinned_empty(torch.Size((3, 5)), torch.float16)
    assert small.is_pinned() and small.shape == (3, 5)
    rows = PIN_REGISTER_MIN // (1024 * 2) + 3  # just above the cut-off, fp16 rows of 1024
    t = pinned_empty(torch.Size((rows, 1024)), torch.float16)
    assert t.is_pinned() and t.untyped_storage().nbytes() == rows * 1024 * 2
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.float16)
    t.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(t.cuda(), x)
    cudart = torch.cuda.cudart()
    keep = t.untyped_storage()  # the memory stays allocated; only the tensor (and its registration) goes
    del t
    gc.collect()
    assert int(cudart.cudaHostRegister(keep.data_ptr(), keep.nbytes(), 0)) == 0
    assert int(cudart.cudaHostUnregister(keep.data_ptr())) == 0
    assert int(cudart.cudaHostRegister(0, 4096, 0)) != 0  # a failed registration sets CUDA's last error ...
    _clear_cuda_error()  # ... which pinned_empty clears before it raises, or torch's next launch would report it
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()


def test_ranks_flag_spawns_gloo_processes(tmp_path: Path) -> None:
    """`spqr quantize --ranks 2 --device cpu` launches 2 gloo ranks itself (torch.distributed.run) with the same
    options: the records equal a one-process run's bit for bit, the report is printed once (by rank 0), and a
    --ranks the host cannot serve is a one-line error before any work."""
    from spqr_cli.demo import DEMO_CALIB

    def spqr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spqr_cli", "quantize", str(DOCS_3M), "--dataset",
                               f"file:{DEMO_CALIB}", "--nsamples", "16", "--seqlen", "32", "--method", "gptq",
                               "--device", "cpu", *args], cwd=REPO, capture_output=True, text=True, timeout=600)

    one, two = spqr("--out", str(tmp_path / "one")), spqr("--out", str(tmp_path / "two"), "--ranks", "2", "--no-dense")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert_same(streamed_records(tmp_path / "one"), streamed_records(tmp_path / "two"))
    assert two.stdout.count("quantized layers") == 1 and two.stdout.count("quantizing ") == 1, two.stdout
    assert {r["rank"] for r in json.loads((tmp_path / "two" / "report.json").read_text())["layers"]} == {0, 1}
    assert not (tmp_path / "two" / "dense").exists()  # the ranks got the other options too
    bad = subprocess.run([sys.executable, "-m", "spqr_cli", "quantize", str(DOCS_3M), "--out", str(tmp_path / "x"),
                          "--ranks", "2", "--device", "cuda"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert bad.returncode == 2 and "no CUDA GPU is visible" in bad.stderr and not (tmp_path / "x").exists()
    bad = spqr("--out", str(tmp_path / "y"), "--ranks", "2", "--wbits", "9")  # refused before any rank starts
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "--wbits 9" in bad.stderr, bad.stderr
    assert "ChildFailedError" not in bad.stderr and not (tmp_path / "y").exists()
    for flag in (("--tune-steps", "5"), ("--asym-calib",)):  # the fine-tune and asymmetric calibration run in one
        bad = spqr("--out", str(tmp_path / "z"), "--ranks", "2", *flag)
        assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "runs in one process, not 2" in bad.stderr
    assert not (tmp_path / "z").exists()


def test_changed_config_error_names_the_fields_and_how_to_resume(tmp_path: Path) -> None:
    """A run saved before a preset changed (here: without clip_grid) is refused with the fields that differ and
    the flags that resume it; a run with the same values resumes."""
    old = load_preset("spqr-3.9bit").replace(clip_grid=0).to_dict()
    assert "clip_grid" not in old
    state = {"format": driver.FORMAT, "model": "m", "config": load_preset("spqr-3.9bit").to_dict(), "calibration": {},
             "dense": True}
    (tmp_path / "records").mkdir()
    (tmp_path / "quant_config.json").write_text(json.dumps({**state, "config": old, "completed_blocks": 1}))
    with pytest.raises(SpQRError, match=r"different config \(clip_grid 0 there, 100 here; to resume it, give its "
                                        r"values: --clip-grid 0\)"):
        driver._prepare_out_dir(tmp_path, state, restart=False)
    assert driver._prepare_out_dir(tmp_path, {**state, "config": old}, restart=False) == 1
