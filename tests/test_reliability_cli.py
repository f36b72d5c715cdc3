"""Issue 18, the command-line part: bad inputs end in one ``error:`` line (exit 2, no traceback, nothing written),
local paths are checked before torch is imported, help shows plain flags, output to files is not wrapped, the
progress has an ETA and a non-TTY heartbeat, and packed CPU layers cache their decoded weights (bit-identical).

``BAD_INPUTS`` lists every bad input tried here (counted in docs/reliability.md).
"""

from __future__ import annotations

import gc
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import spqr_kernels.decode as decode
from spqr_cli.cli import app, check_output_file, looks_local
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.progress import FILE_WIDTH, EtaClock, eta_progress, format_seconds, make_console
from spqr_cli.demo import DEMO_TEST
from spqr_cli.runtime.linear import SpQRLinear
from spqr_kernels.synthetic import random_packed

runner = CliRunner()

# Run the CLI in a fresh interpreter and report on stdout whether torch got imported before it exited.
_PROBE = ("import sys\nfrom spqr_cli.cli import app\ntry:\n    app(sys.argv[1:], prog_name='spqr')\n"
          "except SystemExit as e:\n    print('torch imported:', 'torch' in sys.modules, 'exit', e.code)\n")


def assert_one_line_error(code: int, stderr: str, message: str) -> None:
    """Exit code 2 and exactly one ``error: ...`` line on stderr that contains ``message``; no traceback."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], stderr


# ------------------------------------------------------------------------ bad local paths: before torch (items 2, 3)

def _early_cases(tmp: Path, packed: Path) -> list[tuple[list[str], str]]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("not a directory\n")
    return [
        (["eval", "./no/such/model"], "does not exist"),
        (["eval", str(tmp / "missing-model")], "does not exist"),
        (["eval", "~/no-such-spqr-model"], "does not exist"),
        (["eval", "org/name/extra"], "does not exist"),  # two slashes: not a hub id
        (["eval", str(a_file)], "is a file"),
        (["eval", str(packed), "--dataset", f"file:{tmp / 'missing.txt'}"], "not found"),
        (["eval", str(packed), "--dataset", f"file:{tmp}"], "is a directory"),
        (["eval", str(packed), "--data-dir", str(tmp / "no-data")], "--data-dir"),
        (["eval", str(packed), "--json", str(a_file / "r.json")], "is a file, not a directory"),
        (["eval", str(packed), "--json", str(a_file / "deeper" / "r.json")], "is a file, not a directory"),
        (["eval", str(packed), "--json", str(tmp)], "is a directory"),
        (["run", "./no/such/model", "--prompt", "hi"], "does not exist"),
        (["run", str(a_file), "--prompt", "hi"], "is a file"),
        (["pack", str(tmp / "no-quant"), "--out", str(tmp / "p")], "does not exist"),
        (["pack", str(a_file), "--out", str(tmp / "p")], "is a file"),
        (["unpack", str(tmp / "no-packed"), "--out", str(tmp / "d")], "does not exist"),
        (["unpack", str(a_file), "--out", str(tmp / "d")], "is a file"),
        (["inspect", str(tmp / "no-packed")], "does not exist"),
        (["inspect", str(packed), "--json", str(a_file / "i.json")], "is a file, not a directory"),
        (["inspect", str(packed), "--json", str(tmp)], "is a directory"),
        (["bench", "--json", str(a_file / "b.json")], "is a file, not a directory"),
        (["bench", "--json", str(tmp)], "is a directory"),
    ]


EARLY_CASES = 22


def test_bad_local_paths_fail_before_torch_is_imported(tmp_path, quantized_demo):
    cases = _early_cases(tmp_path, quantized_demo["packed"])
    assert len(cases) == EARLY_CASES
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)
        assert_one_line_error(2, proc.stderr, message)
        assert "torch imported: False exit 2" in proc.stdout, (args, proc.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no directory created


@pytest.mark.parametrize("ref,local", [
    ("meta-llama/Llama-2-7b-hf", False), ("gpt2", False), ("./model", True), ("/abs/model", True),
    ("~/model", True), ("a/b/c", True), ("tests", True),
])
def test_looks_local_rule(ref, local, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert looks_local(ref) is local


@pytest.mark.parametrize("cmd", ["eval", "run"])
def test_hub_id_still_goes_to_the_hub(cmd, monkeypatch):
    """``org/name`` that is no local path passes the early checks and reaches the loader (the hub path)."""
    import spqr_cli.core.evaluate as evaluate
    import spqr_cli.runtime.generation as generation

    def reached(path, *_a, **_k):
        raise SpQRError(f"reached the loader with {path}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # settle_hub_mode leaves the environment alone
    monkeypatch.setattr(evaluate, "evaluate_datasets", reached)
    monkeypatch.setattr(generation, "load_for_generation", reached)
    extra = ["--prompt", "hi"] if cmd == "run" else []
    result = runner.invoke(app, [cmd, "meta-llama/Llama-2-7b-hf", "--device", "cpu", *extra])
    assert_one_line_error(result.exit_code, result.stderr, "reached the loader with meta-llama/Llama-2-7b-hf")


def test_json_output_dir_is_created_when_missing(tmp_path, demo_model_path):
    out = tmp_path / "new" / "sub" / "r.json"
    result = runner.invoke(app, ["eval", str(demo_model_path), "--dataset", f"file:{DEMO_TEST}", "--seqlen", "64",
                                 "--max-windows", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["windows"] == 1


def test_check_output_file_accepts_dash_and_new_files(tmp_path):
    check_output_file(Path("-"), "--json", dash_is_stdout=True)
    check_output_file(tmp_path / "x" / "y.json", "--json")
    (tmp_path / "f").write_text("")
    with pytest.raises(SpQRError, match="is a file"):
        check_output_file(tmp_path / "f" / "y.json", "--json")


# ------------------------------------------------------------------------------------ spqr run settings (item 1)

RUN_CASES = [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--top-p", "-0.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k"),
    (["--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--sample", "--temperature", "-1"], "--temperature must be > 0"),
    (["--sample", "--temperature", "inf"], "--temperature must be > 0"),
    (["--sample", "--temperature", "nan"], "--temperature must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
    (["--top-k", "x"], "--top-k"),
    (["-n", "8"], "No such option: -n"),  # run has no short flags: -n is --nsamples, -p --preset elsewhere
    (["-p", "hi"], "No such option: -p"),
    (["--restart"], "No such option: --restart"),
]


@pytest.mark.parametrize("args,message", RUN_CASES)
def test_run_rejects_bad_settings_before_loading(args, message, quantized_demo, monkeypatch):
    import spqr_cli.runtime.generation as generation

    def no_load(*_a, **_k):
        raise AssertionError("the model must not be loaded for a bad setting")

    monkeypatch.setattr(generation, "load_for_generation", no_load)
    prompt = [] if "-p" in args else ["--prompt", "hi"]
    result = runner.invoke(app, ["run", str(quantized_demo["packed"]), *prompt, "--device", "cpu", *args])
    assert_one_line_error(result.exit_code, result.stderr, message)
    assert result.stdout == ""


def test_run_missing_prompt_is_one_line(quantized_demo):
    result = runner.invoke(app, ["run", str(quantized_demo["packed"])])
    assert_one_line_error(result.exit_code, result.stderr, "Missing option '--prompt'")


@pytest.mark.parametrize("kwargs,message", [
    ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"top_k": -2}, "--top-k"),
    ({"do_sample": True, "temperature": -0.1}, "--temperature"), ({"max_new_tokens": 0}, "--max-new-tokens"),
])
def test_python_api_checks_settings_before_loading(kwargs, message, monkeypatch):
    import spqr_cli.runtime.generation as generation

    monkeypatch.setattr(generation, "load_for_generation", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SpQRError, match=message):
        generation.run_model("unused", "hi", device="cpu", **kwargs)


def test_greedy_ignores_temperature(quantized_demo):
    result = runner.invoke(app, ["run", str(quantized_demo["packed"]), "--prompt", "The", "--max-new-tokens", "2",
                                 "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------- help (item 4)

COMMANDS = ("calibrate", "quantize", "pack", "unpack", "inspect", "eval", "run", "bench", "demo", "presets")


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_shows_plain_flags_and_metavars(cmd):
    out = runner.invoke(app, [cmd, "--help"] if cmd else ["--help"], terminal_width=200).output
    assert "Usage" in out
    for odd in ("<bool>", "range>", "{model}", "{quant_dir}", "{packed_dir}"):
        assert odd not in out, (cmd, odd)
    flags = {"quantize": "--restart", "pack": "--overwrite", "unpack": "--overwrite", "bench": "--fused-shapes"}
    if cmd in flags:  # the flag, then its help: no type in between
        assert re.search(rf"{flags[cmd]}\s+[A-Za-z]", out) and not re.search(rf"{flags[cmd]}\s+<", out), out


def test_short_flags_mean_one_thing_everywhere():
    import typer

    group = typer.main.get_command(app)
    meaning: dict[str, set[str]] = {}
    for name in COMMANDS:
        for param in group.commands[name].params:
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if o.startswith("-") and not o.startswith("--")):
                meaning.setdefault(short, set()).update(longs)
    assert all(len(longs) == 1 for longs in meaning.values()), meaning
    assert meaning["-n"] == {"--nsamples"} and meaning["-p"] == {"--preset"}


# ----------------------------------------------------------------------------------- console width (item 5)

def test_console_is_wide_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console(stderr=False).width == FILE_WIDTH  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100  # an explicit width still wins


def test_tables_do_not_wrap_in_files(monkeypatch):
    import yaml

    from spqr_cli.core.config import CONFIG_DIR

    monkeypatch.delenv("COLUMNS", raising=False)
    out = runner.invoke(app, ["presets"]).stdout
    description = str(yaml.safe_load((CONFIG_DIR / "spqr-3.9bit.yaml").read_text())["description"])
    assert len(description) > 60 and any("spqr-3.9bit" in ln and description in ln for ln in out.splitlines())


# --------------------------------------------------------------------------------------- progress (item 6)

def test_eta_clock_counts_down_and_restarts_per_stage():
    now = [0.0]
    clock = EtaClock(now=lambda: now[0])
    assert clock.observe(0, 10, "quantize") is None  # nothing finished yet
    now[0] = 5.0
    assert clock.observe(1, 10, "quantize") == pytest.approx(45.0)  # 5 s per block, 9 left
    now[0] = 7.0
    assert clock.observe(1, 10, "quantize") == pytest.approx(43.0)  # counts down between blocks
    now[0] = 8.0
    assert clock.observe(5, 10, "replay") is None  # a new stage (e.g. resumed blocks) restarts the clock
    now[0] = 18.0
    assert clock.observe(6, 10, "replay") == pytest.approx(40.0)
    assert format_seconds(None) == "-" and format_seconds(3725) == "1:02:05"


def _drive(progress, blocks: int = 3) -> None:
    """What quant/driver.py sends: per layer (same count) and per finished block."""
    for i in range(blocks):
        for layer in ("q_proj", "k_proj"):
            progress("quantize", i, blocks, f"model.layers.{i}.self_attn.{layer}")
        progress("quantize", i + 1, blocks, f"block {i} done")


def test_non_tty_progress_prints_one_line_per_block():
    from rich.console import Console

    from spqr_cli.console import quant_progress

    buf = io.StringIO()
    with quant_progress(Console(file=buf)) as progress:
        _drive(progress)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"quantize: {i}/3 blocks, elapsed 0:00:0") and f"block {i - 1} done" in line
        assert "ETA 0:00:0" in line  # known from the first finished block on


def test_tty_progress_shows_eta_after_one_block():
    from rich.console import Console

    buf = io.StringIO()
    bar = eta_progress("{task.fields[stage]}", "blocks", Console(file=buf, force_terminal=True, width=150),
                       "{task.description}")
    column = bar.columns[-2]
    task_id = bar.add_task("", total=None, stage="quantize")
    now = [0.0]
    column.clocks[task_id] = EtaClock(now=lambda: now[0])
    bar.update(task_id, completed=0, total=4)
    assert column.render(bar.tasks[0]).plain == "ETA -"
    now[0] = 60.0
    bar.update(task_id, completed=1)
    assert column.render(bar.tasks[0]).plain == "ETA 0:03:00"


def test_quantize_heartbeat_in_cli_stderr(quantized_demo):
    """The session's quantize ran through CliRunner (stderr not a terminal): one line per decoder block."""
    lines = [ln for ln in quantized_demo["quantize_result"].stderr.splitlines() if ln.startswith("quantize: ")]
    assert len(lines) == 4 and lines[-1].startswith("quantize: 4/4 blocks") and "ETA" in lines[-1], lines


# ----------------------------------------------------------------------------------- CPU weight cache (item 7)

@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.delenv(decode.CACHE_ENV, raising=False)
    decode.clear_cpu_cache()
    yield
    decode.clear_cpu_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cached_layer_is_bit_identical(dtype, fresh_cache, monkeypatch):
    layer = SpQRLinear(random_packed(96, 128, outlier_fraction=0.02, seed=7), torch.randn(96).half())
    x = torch.randn(3, 5, 128).to(dtype)
    monkeypatch.setenv(decode.CACHE_ENV, "0")
    uncached = layer(x)
    assert decode.cpu_cache_bytes() == 0
    monkeypatch.setenv(decode.CACHE_ENV, "1")
    first, second = layer(x), layer(x)
    assert decode.cpu_cache_bytes() == 96 * 128 * 4
    assert torch.equal(first, uncached) and torch.equal(second, uncached) and first.dtype == dtype


def test_cache_decodes_once_and_is_freed_with_the_layer(fresh_cache, monkeypatch):
    calls = []
    real = decode.dequantize_fp16
    monkeypatch.setattr(decode, "dequantize_fp16", lambda pw: calls.append(1) or real(pw))
    layer = SpQRLinear(random_packed(64, 64, outlier_fraction=0.0, seed=1))
    for _ in range(3):
        layer(torch.randn(1, 64))
    assert len(calls) == 1 and decode.cpu_cache_bytes() == 64 * 64 * 4
    del layer
    gc.collect()
    assert decode.cpu_cache_bytes() == 0


def test_cache_over_budget_warns_once_and_stays_exact(fresh_cache, monkeypatch):
    monkeypatch.setenv(decode.CACHE_ENV, str(1.5 * 64 * 64 * 4 / 2**30))  # room for one 64x64 fp32 layer
    layers = [SpQRLinear(random_packed(64, 64, outlier_fraction=0.01, seed=s)) for s in range(3)]
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = [layer(x) for layer in layers] + [layer(x) for layer in layers]
    full = [w for w in seen if "CPU cache of decoded SpQR weights is full" in str(w.message)]
    assert len(full) == 1 and decode.CACHE_ENV in str(full[0].message)
    assert decode.cpu_cache_bytes() == 64 * 64 * 4
    monkeypatch.setenv(decode.CACHE_ENV, "0")
    assert all(torch.equal(a, layer(x)) for a, layer in zip(out[3:], layers, strict=True))


def test_bad_budget_value_warns_and_uses_default(fresh_cache, monkeypatch):
    monkeypatch.setenv(decode.CACHE_ENV, "lots")
    with pytest.warns(RuntimeWarning, match="not a number"):
        budget = decode.cache_budget_bytes()
    assert budget > 0


def test_packed_model_logits_identical_with_and_without_cache(quantized_demo, fresh_cache, monkeypatch):
    from spqr_cli.runtime.loader import load_any_model

    model, _ = load_any_model(str(quantized_demo["packed"]), "fp16", "cpu")
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(decode.CACHE_ENV, "0")
    with torch.no_grad():
        ref = model(ids).logits
    monkeypatch.delenv(decode.CACHE_ENV)
    with torch.no_grad():
        cached, again = model(ids).logits, model(ids).logits
    assert decode.cpu_cache_bytes() > 0
    assert torch.equal(cached, ref) and torch.equal(again, ref)


def test_own_warnings_print_as_one_line(capsys):
    from spqr_cli import cli

    cli._show_warning(RuntimeWarning("the cache\nis full"), RuntimeWarning, decode.__file__, 1)
    assert capsys.readouterr().err == "warning: the cache is full\n"
    cli._show_warning(UserWarning("theirs"), UserWarning, torch.__file__, 7)
    assert "UserWarning: theirs" in capsys.readouterr().err  # other libraries' warnings as Python prints them


# Bad inputs tried in this file (for docs/reliability.md). Through the CLI, each must give exit code 2 and one
# `error:` line: the early path cases, the `spqr run` settings and a missing --prompt. Through the Python API
# (`run_model`), each an SpQRError before loading: 5 settings. The CPU cache: a budget that is not a number and
# one too small (a warning each, results unchanged).
CLI_BAD_INPUTS = EARLY_CASES + len(RUN_CASES) + 1
API_BAD_INPUTS = 5 + 2
