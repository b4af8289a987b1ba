"""``metrics.jsonl``: one JSON record per line (train steps, evaluations, resumes, warnings), appended by
rank 0, rewritten atomically on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recipes.checkpoint import WriteFailed, write_failure

FILE = "metrics.jsonl"


def append(out: Path, record: dict) -> None:
    """Append one record. A failed write (a full disk) raises ``WriteFailed`` naming the file."""
    path = out / FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:  # the file names itself (a failed write's error does not)
        raise WriteFailed(write_failure(error, path)) from None


def restart(out: Path, step: int) -> list[dict]:
    """Rewrite the file with the records up to the resumed ``step`` (a killed run may have logged past its
    checkpoint; a torn last line is dropped with a note), atomically: a temporary file ``os.replace``d over
    it. Returns the records kept."""
    from recipes.plot import parse_metrics

    path = out / FILE
    kept = []
    if step > 0 and path.exists():
        kept = [r for r in parse_metrics(path.read_text(), source=str(path)) if r["step"] <= step]
    partial = path.with_name(f".{FILE}.tmp")
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(partial, path)
    return kept


def logged_eval(records: list[dict], step: int) -> float | None:
    """The validation loss logged at ``step``, if any."""
    return next((r["val_loss"] for r in records if r["type"] == "eval" and r["step"] == step), None)
