"""Running the quality study: each run a fresh ``recipes/pretrain.py`` process, then its result file.

Each process has its own peak memory and resumes from its last checkpoint in ``--out/<run name>`` if an
earlier attempt was interrupted; a run whose result file exists is never run again.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipes.bench import ROOT
from recipes.bench.quality.plan import Result, Run, next_stage, plan_kw
from recipes.bench.quality.results import (
    commit,
    make_record,
    read_result,
    read_results,
    result_path,
    write_result,
)

# pretrain.py's line when the loss or the gradient norm stops being finite (recipes.checkpoint.non_finite_message)
DIVERGED = re.compile(r"error: stopped at step \d+: the (loss|gradient norm) is")


def model_for(run: Run, args) -> str:
    """``--model`` for this run: the study's model, or a copy of its config with another initializer_range."""
    if run.init_range is None:
        return args.model
    from recipes.flags import find_config

    config = json.loads(find_config(args.model).read_text())
    config["initializer_range"] = run.init_range
    path = Path(args.out) / "configs" / f"{Path(args.model).stem}-init{run.init_range:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or json.loads(path.read_text()) != config:
        path.write_text(json.dumps(config, indent=2) + "\n")
    return str(path)


def eval_every(run: Run, args) -> int:
    """About 8 evaluations a run, at least ``--eval-every`` steps apart."""
    steps = math.ceil(run.tokens / (args.batch_size * args.seq_len))
    return max(args.eval_every, math.ceil(steps / 8))


def _rel(path) -> str:
    """A path under the repository relative to it (the recorded command then reads the same on any checkout)."""
    path = str(path)
    try:
        return str(Path(path).resolve().relative_to(ROOT)) if Path(path).is_absolute() else path
    except ValueError:
        return path


def command_for(run: Run, args) -> list[str]:
    """The ``recipes/pretrain.py`` command line (without the interpreter) that trains ``run``."""
    command = [
        "recipes/pretrain.py", "--model", _rel(model_for(run, args)), "--method", run.method, "--lr", repr(run.lr),
        "--seed", str(run.seed), "--tokens", str(run.tokens), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--data-files", _rel(args.train_passages), "--valid-files", _rel(args.valid_passages),
        "--valid-tokens", str(args.valid_tokens), "--cache-dir", _rel(Path(args.out) / "cache"),
        "--out", _rel(Path(args.out) / run.name), "--eval-every", str(eval_every(run, args)),
        "--save-every", str(args.save_every), "--keep", "1", "--resume", "auto", "--threads", str(args.threads),
    ]
    if run.linear_lr_scale != 1:
        command += ["--linear-lr-scale", repr(run.linear_lr_scale)]
    if run.warmup is not None:
        command += ["--warmup", repr(run.warmup)]
    if run.linear_init_std is not None:
        command += ["--linear-init-std", repr(run.linear_init_std)]
    return command


def setup_of(args) -> dict:
    """The settings every run of one study shares; a result file made under others is not this study's."""
    return {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "valid_tokens": args.valid_tokens,
            "passage_chars": args.passage_chars, "data_files": args.data_files, "valid_files": args.valid_files}


def finish(run: Run, args, command=None, wall_seconds=None) -> Result:
    """Write (and with --commit-results commit) the result file of a run that has ended in ``--out``."""
    record = make_record(run, Path(args.out) / run.name, setup_of(args), command, wall_seconds)
    path = write_result(args.results, record)
    result = read_result(path)
    if args.commit_results:
        ppl = f"ppl {result.ppl:.1f}" if result.finished else "diverged"
        commit(path, f"quality study: {run.name} finished ({ppl})")
    return result


def execute(run: Run, args) -> Result:
    """Train one run in a fresh process (resuming its checkpoint if an earlier attempt was interrupted),
    then write its result file. A run that has its result file is not run again."""
    path = result_path(args.results, run)
    if path.exists():
        return read_result(path)
    run_dir = Path(args.out) / run.name
    if (run_dir / "summary.json").exists() or (run_dir / "failed.txt").exists():
        return finish(run, args)  # ended before its result file was written
    run_dir.mkdir(parents=True, exist_ok=True)
    command = command_for(run, args)
    started = time.monotonic()
    for attempt in range(2):  # a killed process resumes once from its checkpoint
        with open(run_dir / "run.log", "a") as log:
            code = subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False).returncode
        if code == 0:
            break
        text = (run_dir / "run.log").read_text()
        if DIVERGED.search(text):
            (run_dir / "failed.txt").write_text("diverged: the loss or the gradient became non-finite\n")
            break
        if attempt == 1:  # a crash is a bug to fix, not a result
            raise RuntimeError(f"run {run.name} failed (exit {code}); see {run_dir / 'run.log'}:\n{text[-2000:]}")
    return finish(run, args, command, time.monotonic() - started)


def run_stage(name: str, runs: list[Run], args) -> list[Result]:
    """Execute one stage's runs, ``--jobs`` at a time, printing each result as it comes."""
    print(f"[quality] stage {name}: {len(runs)} run(s): {', '.join(r.name for r in runs)}", flush=True)
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda r: execute(r, args), runs):
            ppl = f"ppl {result.ppl:.1f}" if result.finished else "diverged"
            print(f"[quality] {datetime.datetime.now():%Y-%m-%d %H:%M} {result.run.name}: {ppl}", flush=True)
            results.append(result)
    return results


def plan_and_run(args, methods) -> list[Result]:
    """Run the next stage's missing runs until no stage has any."""
    while True:
        results = read_results(args.results, setup_of(args))
        step = next_stage(results, **plan_kw(args, methods))
        if step is None:
            return results
        run_stage(*step, args)
