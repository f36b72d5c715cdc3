"""The rich progress bars of long jobs (quantize, eval): label, bar, done/total, elapsed and ETA on stderr."""

from __future__ import annotations

from typing import Any


def eta_progress(label: str, unit: str, console: Any = None, trailer: str | None = None) -> Any:
    """A transient rich ``Progress`` with columns ``label | bar | done/total unit | elapsed | ETA | trailer``.

    ``label`` and ``trailer`` are rich ``TextColumn`` templates (e.g. ``"{task.description}"``).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    if trailer is not None:
        columns.append(TextColumn(trailer))
    return Progress(*columns, console=console or Console(stderr=True), transient=True)
