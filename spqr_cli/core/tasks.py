"""Zero-/few-shot task accuracy through lm-evaluation-harness (``spqr eval --tasks``).

The harness is the field's reference for "does the compressed model still answer like the original": we hand
it our in-memory model (dense or packed, both from ``runtime.loader.load_any_model``) wrapped in its ``HFLM``, so
packed models are scored by exactly the code that scores everyone else's, with no re-implementation of task
prompts or metrics here. lm-eval is an optional dependency (``pip install -e ".[eval]"``) and is imported only
inside these functions, so ``import spqr_cli`` and ``spqr --help`` never pay for it.

Offline, a task runs only if its data set is in the ``datasets`` cache, or if it is a local task (a YAML over a
local file, found through ``include_path``); ``check_tasks`` loads every task before any model is loaded, so a
missing data set fails in seconds with one line that says how to provide it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spqr_cli.core.errors import SpQRError

INSTALL_HINT = 'pip install -e ".[eval]"'


@dataclass
class TaskScore:
    """One metric of one task (or group) for one model."""

    task: str
    metric: str  # e.g. "acc", "acc_norm", "exact_match (strict-match)" (lm-eval's filter in parentheses)
    value: float
    stderr: float | None
    samples: int | None  # documents scored (after --limit)


@dataclass
class ModelTaskResult:
    """All task scores of one model."""

    model: str
    role: str  # "baseline" or "model"
    scores: list[TaskScore]
    seconds: float
    device: str
    compute_dtype: str

    def score(self, task: str, metric: str) -> TaskScore | None:
        return next((s for s in self.scores if s.task == task and s.metric == metric), None)


@dataclass
class TaskEvalResult:
    """``evaluate_task_paths``' answer: one ``ModelTaskResult`` per model, the baseline first when given."""

    tasks: list[str]
    num_fewshot: int | None
    limit: float | None
    lm_eval_version: str
    models: list[ModelTaskResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or one clear error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise SpQRError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"arc_easy, hellaswag"`` or a list -> unique task names in order; an empty list is refused."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise SpQRError("--tasks is empty: give comma-separated lm-eval task names, e.g. --tasks arc_easy,hellaswag")
    return names


def check_limit(limit: float | None) -> float | int | None:
    """lm-eval's ``limit``: documents per task (an integer >= 1) or a fraction of each task in (0, 1)."""
    if limit is None:
        return None
    if not (limit > 0 and math.isfinite(limit)):
        raise SpQRError(f"--limit must be > 0 (documents per task, or a fraction below 1), got {limit}")
    if limit >= 1:
        if limit != int(limit):
            raise SpQRError(f"--limit of 1 or more counts documents and must be a whole number, got {limit}")
        return int(limit)
    return float(limit)


def task_manager(names: Sequence[str], include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None
                 ) -> Any:
    """An lm-eval ``TaskManager`` that knows ``names``.

    Indexing the harness's ~15,000 built-in task YAMLs takes ~10 s, so when every requested name is a task of
    ``include_path`` the built-ins are skipped."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=[str(p) for p in paths] or None)


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if include_path is None:
        return []
    raw = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [Path(p).expanduser() for p in raw]
    for p in paths:
        if not p.exists():
            raise SpQRError(f"--include-path {p} does not exist (a directory of lm-eval task YAML files)")
    return paths


def check_tasks(manager: Any, names: Sequence[str]) -> None:
    """Build every task once (this reads its data set), so that an unknown name or data that cannot be had
    (offline and not cached) fails before any model is loaded, with one line naming the task and the fix."""
    for name in names:
        try:
            manager.load([name])
        except KeyError:
            raise SpQRError(f"unknown lm-eval task {name!r}: see `lm_eval ls tasks` for the built-in names, or pass "
                            "--include-path DIR with a task YAML that defines it") from None
        except Exception as e:  # noqa: BLE001 (datasets/hub raise many types: ConnectionError, FileNotFoundError, ...)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise SpQRError(
                f"task {name!r}: its data could not be loaded ({type(e).__name__}: {first}); offline, lm-eval tasks "
                "run only from the datasets cache: run the task once where the hub is reachable (or copy that "
                "machine's HF_DATASETS_CACHE / HF_HOME here), or write a local task YAML over a JSON file and pass "
                "--include-path DIR") from None


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def offline_when_unreachable() -> Iterator[None]:
    """Inside the block, huggingface_hub and datasets are in cache-only mode when the hub cannot be reached (or
    ``SPQR_OFFLINE=1``): otherwise each uncached task retries the network for tens of seconds. The environment
    variables are restored after it, so that a program calling ``evaluate_task_paths`` keeps its own settings.

    Both libraries read the variables when they are first imported: the block must come first (as it does for
    ``spqr eval --tasks``), and a library imported inside it stays in the mode it found."""
    from spqr_cli.core.data import settle_hub_mode

    saved = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    try:
        settle_hub_mode(None)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def evaluate_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 1, manager: Any = None,
                   include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an already-loaded model: its ``results`` dict plus ``n-samples``.

    ``model`` is any transformers causal LM (a packed one included); ``manager`` is a ``task_manager(...)`` to
    reuse across models (built from ``include_path`` otherwise)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if batch_size < 1:
        raise SpQRError("--batch-size must be >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise SpQRError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    names = parse_tasks(tasks)
    manager = manager if manager is not None else task_manager(names, include_path)
    was_training = model.training
    model.eval()
    try:
        with _quiet_known_warnings():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                          limit=check_limit(limit), task_manager=manager, log_samples=False)
    finally:
        model.train(was_training)
    return {"results": out["results"], "n-samples": out.get("n-samples", {}), "versions": out.get("versions", {})}


# lm-eval warnings that are expected here and say nothing to our users: we pass an in-memory model on purpose, and
# local tasks load their data through a function
_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
          "Custom kwargs can be passed to `--metadata`")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


@contextlib.contextmanager
def _quiet_known_warnings() -> Iterator[None]:
    """Drop ``_NOISE`` from lm-eval's log. A logger's filters see the records logged on it, so the filter goes on
    every ``lm_eval.*`` logger (each module logs on its own; they exist once the harness is imported)."""
    drop = _DropNoise()
    loggers = [logging.getLogger("lm_eval")]
    loggers += [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                if name.startswith("lm_eval.") and isinstance(lg, logging.Logger)]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def scores_from_results(out: dict[str, Any]) -> list[TaskScore]:
    """Flatten lm-eval's ``{"task": {"acc,none": x, "acc_stderr,none": s, ...}}`` into ``TaskScore`` rows."""
    rows: list[TaskScore] = []
    for task, metrics in out["results"].items():
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(TaskScore(task=task, metric=metric if filt == "none" else f"{metric} ({filt})",
                                  value=float(value), samples=n,
                                  stderr=float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def evaluate_task_paths(model: str, tasks: str | Sequence[str], *, baseline: str | None = None,
                        num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 1,
                        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                        dtype: str = "fp16", device: str = "auto", verify: bool = True) -> TaskEvalResult:
    """Score ``model`` (and first ``baseline``, e.g. the fp16 original of a packed model) on lm-eval ``tasks``.

    Every setting and every task (its data included) is checked before the first model is loaded; the models
    are loaded one at a time (``load_any_model``) and freed after their run, so the two never share memory."""
    lm_eval = require_lm_eval()
    from spqr_cli.runtime.loader import load_any_model

    names = parse_tasks(tasks)
    limit = check_limit(limit)
    if batch_size < 1:
        raise SpQRError("--batch-size must be >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise SpQRError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    result = TaskEvalResult(tasks=names, num_fewshot=num_fewshot, limit=limit, lm_eval_version=lm_eval.__version__)
    with offline_when_unreachable():
        manager = task_manager(names, include_path)
        with _quiet_known_warnings():
            check_tasks(manager, names)
        for role, path in (("baseline", baseline), ("model", model)):
            if path is None:
                continue
            loaded, tokenizer = load_any_model(path, dtype, device, verify=verify)
            param = next(loaded.parameters())
            started = time.perf_counter()
            out = evaluate_tasks(loaded, tokenizer, names, num_fewshot=num_fewshot, limit=limit,
                                 batch_size=batch_size, manager=manager)
            result.models.append(ModelTaskResult(
                model=path, role=role, scores=scores_from_results(out), seconds=time.perf_counter() - started,
                device=str(param.device), compute_dtype=str(param.dtype).removeprefix("torch.")))
            del loaded, tokenizer, param
            _free_memory()
    return result


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
