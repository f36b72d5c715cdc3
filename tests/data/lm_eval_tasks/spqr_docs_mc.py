"""Data of the ``spqr_docs_mc`` lm-eval task: the JSONL file beside this module, read without the hub or the
datasets cache (a task YAML's ``data_files`` would be resolved against the working directory, not the YAML's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(**_metadata: Any) -> Any:
    """The ``test`` split as a ``datasets.DatasetDict`` (lm-eval calls this with the task's metadata)."""
    import datasets

    path = Path(__file__).with_suffix(".jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
