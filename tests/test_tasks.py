"""`spqr eval --tasks`: lm-evaluation-harness tasks on dense and packed models (``spqr_cli.core.tasks``).

The acceptance check: our command's accuracy on the local task (tests/data/lm_eval_tasks/spqr_docs_mc.yaml, 20
multiple-choice items) equals what lm-eval itself computes when it loads the models its own way (the packed
model's dense unpacked copy, and the fp16 original), and the fp16-vs-packed table is printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.tasks import check_limit, parse_tasks

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "docs-llama-3m"
TASKS = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
TASK = "spqr_docs_mc"

needs_model = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models/docs-llama-3m not available")


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub libraries in cache-only mode for the test (its tasks are local); monkeypatch undoes it after."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def packed_3m(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Path]:
    """docs-llama-3m quantized (spqr-3.9bit, 4 x 64 random calibration tokens), packed, and unpacked again."""
    from spqr_cli.core.config import load_preset
    from spqr_cli.format.pack import pack_model, unpack_model
    from spqr_cli.quant.driver import quantize_model

    if not MODEL.is_dir():
        pytest.skip("../shared/models/docs-llama-3m not available")
    root = tmp_path_factory.mktemp("tasks")
    calib = torch.randint(3, 8000, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(str(MODEL), load_preset("spqr-3.9bit"), root / "quant", calib, device="cpu")
    pack_model(root / "quant", root / "packed")
    unpack_model(root / "packed", root / "dense")
    return {"packed": root / "packed", "dense": root / "dense"}


def _direct_lm_eval(pretrained: Path) -> dict[str, float]:
    """lm-eval on its own: it loads the HF checkpoint itself (fp32 on CPU, as ours runs there)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args={"pretrained": str(pretrained), "dtype": "float32"},
                          tasks=[TASK], device="cpu", batch_size=8, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    res = out["results"][TASK]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


@needs_model
def test_cli_matches_direct_lm_eval(packed_3m: dict[str, Path], tmp_path: Path, offline_env: None) -> None:
    pytest.importorskip("lm_eval")
    out_json = tmp_path / "tasks.json"
    result = CliRunner().invoke(app, ["eval", str(packed_3m["packed"]), "--tasks", TASK, "--include-path",
                                      str(TASKS), "--baseline", str(MODEL), "--batch-size", "8", "--device", "cpu",
                                      "--output", str(out_json)], terminal_width=250)
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    got = {m["role"]: {s["metric"]: s["value"] for s in m["scores"] if s["task"] == TASK} for m in data["models"]}
    assert [m["role"] for m in data["models"]] == ["baseline", "model"]
    assert all(s["samples"] == 20 for m in data["models"] for s in m["scores"])

    assert got["model"] == _direct_lm_eval(packed_3m["dense"])  # packed == its dense copy, scored by lm-eval
    assert got["baseline"] == _direct_lm_eval(MODEL)
    assert got["baseline"]["acc"] > 0.25  # the trained model beats chance (4 choices) on its own domain

    # the side-by-side table: both models' columns, each metric's values and the difference
    out = result.output
    assert f"baseline: {MODEL}" in out and f"model: {packed_3m['packed']}" in out and "delta" in out
    for metric in ("acc", "acc_norm"):
        base, packed = got["baseline"][metric], got["model"][metric]
        line = next(ln for ln in out.splitlines() if f" {metric} " in ln and TASK in ln)
        assert f"{base:.4f}" in line and f"{packed:.4f}" in line and f"{packed - base:+.4f}" in line


@needs_model
def test_limit_and_fewshot_reach_lm_eval(offline_env: None) -> None:
    pytest.importorskip("lm_eval")
    from spqr_cli.core.tasks import evaluate_task_paths

    res = evaluate_task_paths(str(MODEL), TASK, include_path=TASKS, limit=5, num_fewshot=1, batch_size=4,
                              device="cpu")
    assert res.limit == 5 and res.num_fewshot == 1 and len(res.models) == 1
    assert {s.metric for s in res.models[0].scores} == {"acc", "acc_norm"}
    assert all(s.samples == 5 and s.value in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for s in res.models[0].scores)


def test_missing_lm_eval_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    result = CliRunner().invoke(app, ["eval", "no/such-model-needed", "--tasks", TASK])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --tasks needs lm-evaluation-harness, which is not installed: pip install -e ".[eval]"']


def test_uncached_task_data_is_one_line(tmp_path: Path, offline_env: None) -> None:
    """Offline, a task whose data set is on the hub and not cached fails before any model loads, naming the fix."""
    pytest.importorskip("lm_eval")
    (tmp_path / "hub_task.yaml").write_text(
        "task: spqr_hub_only\ndataset_path: spqr-test-nobody/not-a-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    result = CliRunner().invoke(app, ["eval", "no/such-model-needed", "--tasks", "spqr_hub_only",
                                      "--include-path", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task 'spqr_hub_only': its data could not be loaded")
    assert "HF_DATASETS_CACHE" in lines[0] and "--include-path" in lines[0]

    # an unknown name (checked on the local index: the CLI would also index lm-eval's ~15,000 built-in tasks, ~10 s)
    from spqr_cli.core.tasks import check_tasks, task_manager

    with pytest.raises(SpQRError, match="unknown lm-eval task 'spqr_nope'.*--include-path"):
        check_tasks(task_manager(["spqr_hub_only"], tmp_path), ["spqr_nope"])


def test_offline_mode_is_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate_task_paths`` puts the hub libraries offline for its own run only: the environment is restored
    after it, whether it returns or raises, and a variable the caller set is left as it was."""
    from spqr_cli.core import tasks

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    monkeypatch.setenv("SPQR_OFFLINE", "1")  # the hub is unreachable: go offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with tasks.offline_when_unreachable():
        assert (os.environ["HF_HUB_OFFLINE"], os.environ["HF_DATASETS_OFFLINE"]) == ("1", "0")
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"

    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    seen: list[dict[str, str | None]] = []

    def stop(names_: list[str], include_path: Any) -> None:
        seen.append({n: os.environ.get(n) for n in names})
        raise SpQRError("stop here")

    pytest.importorskip("lm_eval")
    monkeypatch.setattr(tasks, "task_manager", stop)
    with pytest.raises(SpQRError, match="stop here"):
        tasks.evaluate_task_paths("no/model-needed", TASK)
    assert seen == [{"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}]
    assert not set(names) & set(os.environ)


def test_score_table() -> None:
    """The side-by-side table ``spqr eval --tasks`` prints (``console.render_task_scores``): value ± stderr per model,
    the model's difference from the baseline, and "-" where a model lacks a metric."""
    from rich.console import Console

    from spqr_cli.console import render_task_scores
    from spqr_cli.core.tasks import ModelTaskResult, TaskEvalResult, TaskScore

    base = [TaskScore("arc", "acc", 0.5, 0.01, 20), TaskScore("arc", "acc_norm", 0.55, None, 20)]
    model = [TaskScore("arc", "acc", 0.45, 0.02, 20), TaskScore("arc", "acc_norm", 0.6, None, 20),
             TaskScore("arc", "f1", 0.3, None, None)]
    result = TaskEvalResult(tasks=["arc"], num_fewshot=5, limit=20, lm_eval_version="0.4.x", models=[
        ModelTaskResult("fp16", "baseline", base, 1.0, "cpu", "float32"),
        ModelTaskResult("packed", "model", model, 1.0, "cpu", "float32")])
    console = Console(record=True, width=200)
    render_task_scores(result, console)
    out = console.export_text()
    assert "lm-eval 0.4.x: 5-shot, limit 20" in out and "baseline: fp16" in out and "model: packed" in out
    rows = [[cell.strip() for cell in ln.split("│")[1:-1]] for ln in out.splitlines() if ln.startswith("│")]
    assert rows == [["arc", "acc", "20", "0.5000 ± 0.0100", "0.4500 ± 0.0200", "-0.0500"],
                    ["arc", "acc_norm", "20", "0.5500", "0.6000", "+0.0500"],
                    ["arc", "f1", "", "-", "0.3000", "-"]]


@needs_model
def test_task_option_checks() -> None:
    assert parse_tasks(" arc_easy, hellaswag,arc_easy,") == ["arc_easy", "hellaswag"]
    assert check_limit(None) is None and check_limit(20.0) == 20 and check_limit(0.5) == 0.5
    for bad in (0, -1, 1.5, float("nan")):
        with pytest.raises(SpQRError):
            check_limit(bad)
    with pytest.raises(SpQRError, match="--tasks is empty"):
        parse_tasks(" , ")
    for flags, message in ((["--baseline", str(MODEL)], "--baseline applies to lm-eval tasks: use it with --tasks"),
                           (["--limit", "5", "--num-fewshot", "3"], "--limit, --num-fewshot apply to lm-eval tasks"),
                           (["--tasks", TASK, "--max-windows", "2"], "--seqlen and --max-windows set perplexity")):
        result = CliRunner().invoke(app, ["eval", str(MODEL), *flags], terminal_width=200)
        assert result.exit_code == 2 and message in result.output, result.output
