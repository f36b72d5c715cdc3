"""Progress of long jobs (quantize, eval) on stderr: label, bar, done/total, elapsed and ETA.

On a terminal it is a transient rich bar. Elsewhere (a log file, CI, a pipe) a live bar draws nothing until it
ends, and a transient one nothing at all, so the same calls print one plain line per finished unit instead: a
heartbeat that says how far the job is and when it should end.

The ETA is computed here from the time per finished unit since the bar (or its stage) started, not by rich's
``TimeRemainingColumn``: that one needs several speed samples within its window, so with units that take
minutes (a decoder block) it stayed blank most of the time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Width of a console whose stream is not a terminal (rich would use 80 columns and wrap the tables); $COLUMNS, when
# set, still wins. Wide enough that no table or line of ours wraps.
FILE_WIDTH = 1000


def make_console(stderr: bool = False) -> Any:
    """A rich console on stdout (or stderr); when that stream is not a terminal, as wide as ``FILE_WIDTH`` so that
    output redirected to a file is not wrapped at 80 columns."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = FILE_WIDTH
    return console


def format_seconds(seconds: float | None) -> str:
    """``H:MM:SS``, or ``-`` when not known yet."""
    if seconds is None:
        return "-"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class EtaClock:
    """Seconds left, from the average time per unit finished since the clock (re)started.

    It restarts when ``key`` changes (a new stage, a new total) or the count goes back, so that units that were
    skipped (blocks resumed from disk) or fast (a replay stage) do not make the estimate optimistic. Between two
    finished units the estimate counts down.
    """

    now: Callable[[], float] = time.monotonic
    _key: Any = field(default=None, init=False)
    _start: tuple[float, float] | None = field(default=None, init=False)  # (done, time) at the (re)start
    _last: tuple[float, float] = field(default=(0.0, 0.0), init=False)  # (done, time) of the latest change

    def observe(self, done: float, total: float | None, key: Any = None) -> float | None:
        """Record the count ``done`` of ``total``; return the seconds left, or ``None`` before the first unit."""
        t = self.now()
        if self._start is None or key != self._key or done < self._last[0]:
            self._key, self._start, self._last = key, (done, t), (done, t)
            return None
        if done != self._last[0]:
            self._last = (done, t)
        done0, t0 = self._start
        last_done, last_t = self._last
        if total is None or last_done <= done0:
            return None
        per_unit = (last_t - t0) / (last_done - done0)
        return max(per_unit * (total - last_done) - (t - last_t), 0.0)


def _eta_column() -> Any:
    """A rich column ``ETA H:MM:SS`` fed by one ``EtaClock`` per task (restarted when its stage changes)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.clocks: dict[Any, EtaClock] = {}

        def render(self, task: Any) -> Text:
            clock = self.clocks.setdefault(task.id, EtaClock())
            eta = clock.observe(task.completed, task.total, (task.total, task.fields.get("stage")))
            return Text(f"ETA {format_seconds(eta)}", style="progress.remaining")

    return EtaColumn()


@dataclass
class _Task:
    """What ``PlainProgress`` knows of a task; shaped like rich's ``Task`` for the label templates."""

    id: int
    description: str
    total: float | None
    fields: dict[str, Any]
    completed: float = 0.0
    clock: EtaClock = field(default_factory=EtaClock)
    started: float = field(default_factory=time.monotonic)


class PlainProgress:
    """The subset of rich's ``Progress`` the jobs use (``add_task``, ``update``, ``advance``), printing one plain
    line per finished unit: ``label: done/total unit, elapsed H:MM:SS, ETA H:MM:SS  trailer``."""

    def __init__(self, label: str, unit: str, console: Any, trailer: str | None = None) -> None:
        self.label, self.unit, self.console, self.trailer = label, unit, console, trailer
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task_id = len(self.tasks)
        task = self.tasks[task_id] = _Task(task_id, description, total, dict(fields), float(completed))
        task.clock.observe(task.completed, task.total, (task.total, task.fields.get("stage")))  # start the clock
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        before = task.completed
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += advance
        eta = task.clock.observe(task.completed, task.total, (task.total, task.fields.get("stage")))
        if task.completed > before:
            self._line(task, eta)

    def _line(self, task: _Task, eta: float | None) -> None:
        of = f"/{task.total:g}" if task.total is not None else ""
        elapsed = format_seconds(time.monotonic() - task.started)
        line = (f"{_plain(self.label, task)}: {task.completed:g}{of} {self.unit}, elapsed {elapsed}, "
                f"ETA {format_seconds(eta)}")
        if self.trailer is not None:
            line += "  " + _plain(self.trailer, task)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _plain(template: str, task: _Task) -> str:
    """A rich ``TextColumn`` template filled in for ``task``, without its markup."""
    from rich.errors import MarkupError
    from rich.text import Text

    text = template.format(task=task)
    try:
        return Text.from_markup(text).plain
    except MarkupError:  # a description with brackets that are not markup
        return text


def eta_progress(label: str, unit: str, console: Any = None, trailer: str | None = None,
                 enabled: bool = True) -> Any:
    """A progress display with columns ``label | bar | done/total unit | elapsed | ETA | trailer`` on ``console``
    (default stderr): a transient rich ``Progress`` on a terminal, else a ``PlainProgress`` (one line per unit);
    with ``enabled=False`` the same object on a quiet console (library calls that asked for no progress).

    ``label`` and ``trailer`` are rich ``TextColumn`` templates (e.g. ``"{task.description}"``).
    """
    if not enabled:
        from rich.console import Console

        return PlainProgress(label, unit, Console(quiet=True), trailer)
    console = console or make_console(stderr=True)
    if not console.is_terminal:
        return PlainProgress(label, unit, console, trailer)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
               _eta_column()]
    if trailer is not None:
        columns.append(TextColumn(trailer))
    return Progress(*columns, console=console, transient=True)
