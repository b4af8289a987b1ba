"""The quality study's result files: one small JSON file per ended run, the study's only lasting record.

A result file (``docs/benchmarks/quality/<run name>.json``) holds the run's configuration, its setup,
initial and final validation loss and perplexity, the evaluation curve, parameters, peak memory and
tokens/s. Its format (:data:`FORMAT`) is fixed: the files already committed must keep reading the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from recipes.bench import ROOT
from recipes.bench.quality.plan import Result, Run

FORMAT = 1  # of the result files
NUMBER_LIST = re.compile(r"\[\s*([-+\d.eE,\s]+?)\s*\]")  # [1, 2.5e-3] on one line: the curves stay short
SETUP_KEYS = ("model", "batch_size", "seq_len", "valid_tokens", "passage_chars")


def result_path(results_dir, run: Run) -> Path:
    """Where ``run``'s result file is (or will be) in ``results_dir``."""
    return Path(results_dir) / f"{run.name}.json"


def write_result(results_dir, record: dict) -> Path:
    """Write a result file atomically (a temporary file replaced into place)."""
    path = Path(results_dir) / f"{record['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(record, indent=1)
    text = NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def read_result(path) -> Result:
    """One result file; a diverged run's perplexity is inf."""
    record = json.loads(Path(path).read_text())
    run = Run(**record["run"])
    if run.name != record["name"] or Path(path).stem != run.name:
        raise ValueError(f"{path}: its run {run.name!r} does not match its name {record['name']!r}")
    ppl = record["final_val_ppl"] if record["status"] == "finished" else math.inf
    return Result(run, ppl, record)


def read_results(results_dir, setup: dict | None = None) -> list[Result]:
    """Every result file in ``results_dir``; with ``setup``, refuses a file made under another setup
    (model, batch, sequence length, validation tokens, passage size): those runs are not this study's."""
    results = []
    for path in sorted(Path(results_dir).glob("*.json")):
        result = read_result(path)
        if setup is not None:
            theirs = {k: result.record["setup"].get(k) for k in SETUP_KEYS}
            ours = {k: setup.get(k) for k in SETUP_KEYS}
            if theirs != ours:
                raise SystemExit(f"{path} was made with {theirs}, not this study's {ours}: give another --results "
                                 f"folder for another setup")
        results.append(result)
    return results


def median_tokens_per_s(records: list[dict], tokens_per_step: int) -> float | None:
    """Tokens per second of the median training step, from the cumulative step times in metrics.jsonl."""
    times = [r["time"] for r in records if r.get("type") == "train"]
    steps = [b - a for a, b in itertools.pairwise(times) if b > a]  # a resumed run restarts its clock: skip that step
    return tokens_per_step / statistics.median(steps) if steps else None


def linear_parameters(parameters: dict) -> int:
    """The weights of the decoder's linear layers (dense, or their factors), from a summary's counts."""
    return (parameters["dense_linear"] + parameters["lowrank_factors"] + parameters["sparse"]
            + parameters.get("other_factors", 0))


def make_record(run: Run, run_dir: Path, setup: dict, command: list[str] | None = None,
                wall_seconds: float | None = None) -> dict:
    """The result file of a run from its directory: ``summary.json`` and ``metrics.jsonl``, or ``failed.txt``."""
    from recipes.plot import parse_metrics

    metrics = run_dir / "metrics.jsonl"
    records = parse_metrics(metrics.read_text(), source=str(metrics)) if metrics.exists() else []
    evals = [r for r in records if r.get("type") == "eval"]
    record = {"format": FORMAT, "name": run.name, "run": dataclasses.asdict(run), "setup": setup,
              "command": command, "date": datetime.date.today().isoformat(), "machine": _machine()}
    if not (run_dir / "summary.json").exists():
        return {**record, "status": "diverged", "note": (run_dir / "failed.txt").read_text().strip(),
                "eval": [[r["step"], r["tokens"], r["val_loss"]] for r in evals]}
    summary = json.loads((run_dir / "summary.json").read_text())
    per_step = summary["tokens"] // max(1, summary["steps"])
    train = [r for r in records if r.get("type") == "train"]
    every = max(1, len(train) // 64)  # a thinned training curve: 64 points of the mean loss over each stretch
    curve = [[train[i + every - 1]["tokens"], statistics.fmean(r["loss"] for r in train[i:i + every])]
             for i in range(0, len(train) - every + 1, every)]  # whole stretches only: no one-step tail
    return {**record, "status": "finished",
            "initial_val_loss": evals[0]["val_loss"] if evals else None,
            "initial_val_ppl": summary["initial_val_ppl"],
            "final_val_loss": summary["final_val_loss"], "final_val_ppl": summary["final_val_ppl"],
            "eval": [[r["step"], r["tokens"], r["val_loss"]] for r in evals], "train_loss": curve,
            "steps": summary["steps"], "tokens": summary["tokens"],
            "parameters": summary["parameters"], "linear_parameters": linear_parameters(summary["parameters"]),
            "peak_memory_mib": summary["peak_memory_mib"], "memory_kind": summary["memory_kind"],
            "tokens_per_s": median_tokens_per_s(records, per_step), "tokens_per_s_mean": summary["tokens_per_s"],
            "train_seconds": summary["train_seconds"], "wall_seconds": wall_seconds}


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


_GIT_LOCK = threading.Lock()


def commit(path: Path, message: str, attempts: int = 30, repo: Path = ROOT) -> bool:
    """``git add path && git commit -m message -- path``: that file only, whatever else is staged; retried
    while another git process holds the index lock. Returns whether it committed."""
    rel = os.path.relpath(path, repo)

    def git(*a):
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=False)

    with _GIT_LOCK:
        for attempt in range(attempts):
            step = git("add", "--", rel)
            if step.returncode == 0:
                step = git("commit", "-q", "-m", message, "--", rel)
                if step.returncode == 0:
                    return True
            error = step.stderr + step.stdout
            if "index.lock" in error:
                time.sleep(min(30, 1 + attempt))
                continue
            if "nothing to commit" in error or "no changes added" in error or "nothing added" in error:
                return False  # unchanged since it was committed
            print(f"could not commit {rel}: {error.strip()[-500:]}", file=sys.stderr)
            return False
    print(f"could not commit {rel}: the git index stayed locked", file=sys.stderr)
    return False
