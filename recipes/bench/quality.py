"""Quality: validation perplexity of every method as the token budget grows, on the real corpus.

A small LLaMA (``llama_20m`` shapes: d = 256, 4 layers; 7.4M parameters with the 8k tokenizer trained on
the corpus) is trained by ``recipes/pretrain.py`` with each method at several budgets (``--budgets``,
default 1M, 2M, 4M and 8M tokens). The plan is a sequence of stages, each decided by the results of the
ones before it (:func:`plan`):

1. **sweep** (the shortest budget, seed 0): every method at each rate of its grid (:data:`GRIDS`), the
   middle rates of all methods first; where the best rate sits on the edge of the grid, the grid is
   extended by one more factor of 2 (at most ``--max-extensions`` times);
2. **full-rank tuning** (same budget, seed 0): from its best single rate, the split between the
   embeddings/head and the decoder's linear weights (``--linear-lr-scale``), then the warmup, then the
   init scale (``initializer_range``, through a config JSON passed as ``--model``) -- each knob at the
   best setting of the ones before it, so full-rank is tuned on more knobs than any other method;
3. **each longer budget**, shortest first: every method at its best configuration of the sweep, seed 0
   (and full-rank at its best *single* rate too, as "full, one lr": what the tuning buys at each budget);
4. **the longest budget**: every method's rate re-checked at x0.5 and x2, then the best of the three
   again with seeds 1 .. ``--seeds``-1.

Each run is a fresh ``pretrain.py`` process (its own peak memory) in ``--out/<run name>`` (untracked:
checkpoints, metrics). When a run finishes, a small **result file** is written to
``--results/<run name>.json`` (default ``docs/benchmarks/quality/``: its configuration, initial and
final validation loss and perplexity, the evaluation curve, parameters, peak memory, tokens/s), and with
``--commit-results`` it is committed at once (that file only). A run whose result file exists is never run
again, even on a fresh clone with no ``runs/``; an interrupted run resumes from its last checkpoint. The
report (tables, targets, the ratio plot) is built from the result files alone, so ``--report-only`` works
anywhere the repository is checked out, and goes into docs/benchmarks.md and docs/benchmarks/.

    nohup nice -n 19 python -m recipes.bench.quality --jobs 1 --commit-results \\
        --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt' > /tmp/quality-study.log 2>&1 &
    python -m recipes.bench.quality --report-only        # the report from the result files so far
    python -m recipes.bench.quality --plan               # the runs the next stage needs, from the results so far
    python -m recipes.bench.quality --quick --no-write --data-files ... --valid-files ...   # a smoke test

``--data-files`` and ``--valid-files`` (text-file globs) are required except with ``--report-only`` and
``--plan``: the study ships no corpus.
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from recipes.bench import ROOT

PRETRAIN = ROOT / "recipes" / "pretrain.py"
FIGURES = ROOT / "docs" / "benchmarks"
RESULTS = FIGURES / "quality"
FORMAT = 1  # of the result files

# Learning-rate grids, factors of 2. The recipe's defaults (full 1e-3, the structured methods 3e-3, CoLA
# 6e-3, GaLore 1e-2) were too high on this corpus at these budgets: the earlier study's best rates at 500k
# tokens were full 1e-3, low-rank 7.5e-4, SLTrain 1.5e-3 (7.5e-4 within 1%), LOST 7.5e-4, LOST-SiLU 1.5e-3,
# GaLore 2.5e-3, and 4x those diverged toward perplexity 900. Each grid is centred there; CoLA's (new, with
# its own weight decay 0.01 and clipping 0.5) starts from its default and goes down. The edge extension
# reaches the defaults where they are better.
GRIDS = {
    "full": [5e-4, 1e-3, 2e-3],
    "lowrank": [3.75e-4, 7.5e-4, 1.5e-3],
    "sltrain": [7.5e-4, 1.5e-3, 3e-3],
    "lost": [3.75e-4, 7.5e-4, 1.5e-3],
    "lost-silu": [7.5e-4, 1.5e-3, 3e-3],
    "cola": [1.5e-3, 3e-3, 6e-3],
    "galore": [1.25e-3, 2.5e-3, 5e-3],
}
QUICK_GRIDS = {"full": [1e-3, 3e-3], "lost": [3e-3, 1e-2]}
# Full-rank's split: (peak rate of the embeddings, head and norms, as a multiple of its best single rate;
# --linear-lr-scale). The earlier study's best at 500k was 2.5x with 0.25 (the linear weights at 0.625x).
SPLIT_GRID = [(2.5, 0.25), (2.5, 0.125), (5.0, 0.125), (5.0, 0.25)]
WARMUPS = [0.03, 0.3]  # around the recipe's 0.1 (a fraction of the steps)
INIT_RANGES = [0.01, 0.04]  # around transformers' 0.02 (0.04 ~ sqrt(2 / (5 d)), "small init" at d = 256)
STRUCTURED = ("sltrain", "lost", "lost-silu", "cola")  # the target's candidates (SLTrain / LOST / CoLA)
PRIOR = ("The earlier version of this study (the same setup; 500k and 1M tokens, 2 seeds; full-rank at one rate, "
         "the others at theirs; its runs are gone, its table is in the history of this file) had at 1M tokens: full-rank "
         "255.1, low-rank 238.3, SLTrain 157.7, LOST 176.8, LOST-SiLU 144.5, GaLore 158.6 -- SLTrain, LOST, LOST-SiLU "
         "and GaLore 31-43% below full-rank (low-rank 7% below), the reverse of the papers at their budgets and of Glentis et al. 2025 (arXiv "
         "2505.22922), who find a well-tuned full-rank model best. This study asks whether that survives fair "
         "tuning of full-rank and a growing budget.")
FULL_ONE_LR = "full, one lr"  # full-rank at its best single rate, every other setting the recipe's
TRAIN_SHARDS = 8  # of about 1M tokens each: a run's shard order still depends on its seed
MAX_SPLIT_EXTENSIONS = 2
# pretrain.py's line when the loss or the gradient norm stops being finite (recipes.checkpoint.non_finite_message)
DIVERGED = re.compile(r"error: stopped at step \d+: the (loss|gradient norm) is")


def round_lr(x: float) -> float:
    """Rates as 4 significant digits, so that a rate computed twice (x2 then x0.5) names the same run."""
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int
    tokens: int
    linear_lr_scale: float = 1.0
    warmup: float | None = None  # None: the recipe's default for the method
    init_range: float | None = None  # None: the model config's initializer_range (0.02)

    @property
    def name(self) -> str:
        extras = "".join(f"-{tag}{value:g}" for tag, value in (("lls", self.linear_lr_scale if self.linear_lr_scale != 1 else None),
                                                             ("wu", self.warmup), ("init", self.init_range)) if value is not None)
        return f"{self.method}-lr{self.lr:g}{extras}-seed{self.seed}-{self.tokens}tok"

    @property
    def one_lr(self) -> bool:
        """Every setting but the rate is the recipe's."""
        return self.linear_lr_scale == 1 and self.warmup is None and self.init_range is None

    def at(self, **changes) -> Run:
        if "lr" in changes:
            changes["lr"] = round_lr(changes["lr"])
        return dataclasses.replace(self, **changes)

    def config(self) -> tuple:
        """What a configuration is, seed and budget aside."""
        return (self.method, self.lr, self.linear_lr_scale, self.warmup, self.init_range)

    def label(self) -> str:
        parts = [f"lr {self.lr:g}"]
        if self.linear_lr_scale != 1:
            parts.append(f"linear x{self.linear_lr_scale:g}")
        if self.warmup is not None:
            parts.append(f"warmup {self.warmup:g}")
        if self.init_range is not None:
            parts.append(f"init {self.init_range:g}")
        return ", ".join(parts)


@dataclass
class Result:
    run: Run
    ppl: float  # final validation perplexity; inf when the run diverged
    record: dict  # the result file's contents

    @property
    def finished(self) -> bool:
        return self.record.get("status") == "finished"


# ---- the plan --------------------------------------------------------------------------------------
def edge_extension(ppl_by_lr: dict[float, float], factor: float = 2.0) -> float | None:
    """The next rate to try when the best one is the lowest or highest tried, else None.

    >>> edge_extension({1e-3: 30.0, 2e-3: 25.0, 4e-3: 27.0}) is None
    True
    >>> edge_extension({1e-3: 30.0, 2e-3: 25.0, 4e-3: 24.0})
    0.008
    >>> edge_extension({1e-3: 24.0, 2e-3: 25.0})
    0.0005
    """
    if len(ppl_by_lr) < 2:
        return None
    rates = sorted(ppl_by_lr)
    best = min(rates, key=lambda lr: (ppl_by_lr[lr], lr))
    if best == rates[-1] and math.isfinite(ppl_by_lr[best]):
        return round_lr(best * factor)
    if best == rates[0]:
        return round_lr(best / factor)
    return None


def row_method(row: str) -> str:
    return "full" if row == FULL_ONE_LR else row


def candidates(results: list[Result], row: str, tokens: int, seed: int = 0) -> list[Result]:
    """The results that may stand for ``row`` at this budget and seed: every run of its method, or for
    "full, one lr" only the runs with the recipe's settings but the rate."""
    return [r for r in results if r.run.method == row_method(row) and (r.run.tokens, r.run.seed) == (tokens, seed)
            and (row != FULL_ONE_LR or r.run.one_lr)]


def best_run(results: list[Result], row: str, tokens: int) -> Run | None:
    """The seed-0 run with the lowest perplexity for ``row`` at ``tokens`` (ties: the lower rate)."""
    mine = candidates(results, row, tokens)
    return min(mine, key=lambda r: (r.ppl, r.run.lr, r.run.name)).run if mine else None


def best_lr(results: list[Result], method: str, seed: int, tokens: int) -> float | None:
    """The rate with the lowest perplexity among ``method``'s single-rate runs at this seed and budget."""
    mine = [r for r in results if (r.run.method, r.run.seed, r.run.tokens) == (method, seed, tokens) and r.run.one_lr]
    return min(mine, key=lambda r: (r.ppl, r.run.lr)).run.lr if mine else None


def split_extensions(tried: dict[tuple[float, float], float], lr0: float) -> list[tuple[float, float]]:
    """Full-rank's split grid, as {(head rate, linear rate): ppl}: where its best point lies on an edge of
    the rates tried, the next point out along that axis (a factor of 2), if not tried yet."""
    if not tried:
        return []
    best = min(tried, key=lambda k: (tried[k], k))
    if not math.isfinite(tried[best]):
        return []
    heads, linears = sorted({h for h, _ in tried}), sorted({l for _, l in tried})
    h, l = best
    out = []
    if h == heads[-1]:
        out.append((round_lr(2 * h), l))
    elif h == heads[0] and h / 2 > l:
        out.append((round_lr(h / 2), l))
    if l == linears[0]:
        out.append((h, l / 2))
    elif l == linears[-1] and 2 * l < h:
        out.append((h, 2 * l))
    return [k for k in out if k not in tried]


def full_tuning_stages(results: list[Result], short: int):
    """Full-rank's split, warmup and init stages at the short budget (each a list of runs), in order; each
    is decided by the results of those before it, so stop at the first one that has runs left to do."""
    mine = [r for r in results if (r.run.method, r.run.seed, r.run.tokens) == ("full", 0, short)]
    lr0 = best_lr(results, "full", 0, short)
    base = Run("full", lr0, 0, short)
    split = [base.at(lr=lr0 * a, linear_lr_scale=s) for a, s in SPLIT_GRID]
    yield "full-rank: learning-rate split", split

    def key(run: Run) -> tuple[float, float]:  # (the embeddings'/head's rate, the linear layers' rate)
        return run.lr, float(f"{run.lr * run.linear_lr_scale:.6g}")

    tried = {key(r.run): r.ppl for r in mine
             if r.run.warmup is None and r.run.init_range is None and r.run.linear_lr_scale != 1}
    extended = [k for k in tried if k not in {key(r) for r in split}]
    extra = split_extensions(tried, lr0)[: max(0, MAX_SPLIT_EXTENSIONS - len(extended))]
    if extra:
        yield "full-rank: split edges", [base.at(lr=h, linear_lr_scale=round_lr(l / h)) for h, l in extra]
    pool = [r for r in mine if r.run.warmup is None and r.run.init_range is None]
    best = min(pool, key=lambda r: (r.ppl, r.run.lr)).run
    yield "full-rank: warmup", [best.at(warmup=w) for w in WARMUPS]
    pool = [r for r in mine if r.run.init_range is None]
    best = min(pool, key=lambda r: (r.ppl, r.run.lr)).run
    yield "full-rank: init scale", [best.at(init_range=i) for i in INIT_RANGES]


def rows_of(methods) -> list[str]:
    """The comparison's rows: every method, and "full, one lr" after full-rank."""
    rows = []
    for m in methods:
        rows.append(m)
        if m == "full":
            rows.append(FULL_ONE_LR)
    return rows


def stages(results: list[Result], methods, budgets, *, seeds: int = 2, max_extensions: int = 2,
           grids: dict | None = None, tune_full: bool = True):
    """The study's stages as (name, runs), in the order they run; each is computed from the results of the
    stages before it, so this yields up to the first stage that has runs without a result and stops."""
    grids = grids or GRIDS
    have = {r.run for r in results}
    budgets = sorted(budgets)
    short, longest = budgets[0], budgets[-1]

    def pending(stage):
        return any(run not in have for run in stage)

    # 1. the sweep: every method's middle rate first, then the lower ones, then the higher ones
    width = max(len(grids[m]) for m in methods)
    order = sorted(range(width), key=lambda i: (abs(i - (width - 1) / 2), i))
    sweep = [Run(m, grids[m][i], 0, short) for i in order for m in methods if i < len(grids[m])]
    yield "sweep", sweep
    if pending(sweep):
        return
    # 2. the grid's edges, one factor of 2 at a time (each a new run: the stage is pending until it ends)
    extra = []
    for m in methods:
        tried = {r.run.lr: r.ppl for r in results if (r.run.method, r.run.seed, r.run.tokens) == (m, 0, short) and r.run.one_lr}
        lr = edge_extension(tried)
        if lr is not None and len([x for x in tried if x not in grids[m]]) < max_extensions:
            extra.append(Run(m, lr, 0, short))
    if extra:
        yield "grid edges", extra
        return
    # 3. full-rank's tuning
    if tune_full and "full" in methods:
        for name, stage in full_tuning_stages(results, short):
            yield name, stage
            if pending(stage):
                return
    rows = rows_of(methods) if "full" in methods else list(methods)
    # 4. the longer budgets: every row at its best configuration of the sweep
    for tokens in budgets[1:]:
        stage = _unique([best_run(results, row, short).at(tokens=tokens) for row in rows])
        yield f"{tokens:,} tokens", stage
        if pending(stage):
            return
    # 5. the longest budget: the rate x0.5 and x2, then the other seeds of the best
    recheck = []
    for row in rows:
        if row == FULL_ONE_LR:
            continue
        best = best_run(results, row, short).at(tokens=longest)
        recheck += [best.at(lr=best.lr * f) for f in (0.5, 2.0)]
    stage = _unique(recheck)
    yield f"{longest:,} tokens: rate x0.5 and x2", stage
    if pending(stage):
        return
    stage = _unique([best_run(results, row, longest).at(seed=s) for s in range(1, seeds) for row in rows
                     if row != FULL_ONE_LR])
    yield f"{longest:,} tokens: seeds 1..{seeds - 1}", stage


def _unique(runs: list[Run]) -> list[Run]:
    return list(dict.fromkeys(runs))


def next_stage(results: list[Result], **kw) -> tuple[str, list[Run]] | None:
    """The first stage with runs that have no result yet, and those runs; None when the study is done."""
    have = {r.run for r in results}
    for name, stage in stages(results, **kw):
        todo = [r for r in stage if r not in have]
        if todo:
            return name, todo
    return None


def runs_left_estimate(results: list[Result], methods, budgets, seeds: int, **kw) -> int:
    """Runs still to do: the pending stage's, and the stages after it at their fixed sizes (the grid's
    edges and full-rank's split edges, decided as results come in, are counted once they are known)."""
    have = {r.run for r in results}
    left, seen = 0, []
    for name, stage in stages(results, methods, budgets, seeds=seeds, **kw):
        seen.append(name)
        left += sum(r not in have for r in stage)
    budgets = sorted(budgets)
    rows = len(rows_of(methods)) if "full" in methods else len(methods)
    structured_rows = len(methods)
    future = []
    if "full" in methods and kw.get("tune_full", True):
        future += [("full-rank: learning-rate split", len(SPLIT_GRID)), ("full-rank: warmup", len(WARMUPS)),
                   ("full-rank: init scale", len(INIT_RANGES))]
    future += [(f"{t:,} tokens", rows) for t in budgets[1:]]
    future += [(f"{budgets[-1]:,} tokens: rate x0.5 and x2", 2 * structured_rows),
               (f"{budgets[-1]:,} tokens: seeds 1..{seeds - 1}", (seeds - 1) * structured_rows)]
    return left + sum(n for name, n in future if name not in seen)


def tokens_left_estimate(results: list[Result], methods, budgets, seeds: int, **kw) -> int:
    """Training tokens still to do, counted as :func:`runs_left_estimate` counts runs."""
    have = {r.run for r in results}
    left, seen = 0, []
    for name, stage in stages(results, methods, budgets, seeds=seeds, **kw):
        seen.append(name)
        left += sum(r.tokens for r in stage if r not in have)
    budgets = sorted(budgets)
    rows = len(rows_of(methods)) if "full" in methods else len(methods)
    future = []
    if "full" in methods and kw.get("tune_full", True):
        future += [("full-rank: learning-rate split", len(SPLIT_GRID) * budgets[0]),
                   ("full-rank: warmup", len(WARMUPS) * budgets[0]), ("full-rank: init scale", len(INIT_RANGES) * budgets[0])]
    future += [(f"{t:,} tokens", rows * t) for t in budgets[1:]]
    future += [(f"{budgets[-1]:,} tokens: rate x0.5 and x2", 2 * len(methods) * budgets[-1]),
               (f"{budgets[-1]:,} tokens: seeds 1..{seeds - 1}", (seeds - 1) * len(methods) * budgets[-1])]
    return left + sum(n for name, n in future if name not in seen)


def seconds_per_token(results: list[Result]) -> float | None:
    """Wall time per training token of the finished runs (their training time where the wall time was not
    recorded), evaluations and checkpoints included where it was."""
    done = [r.record for r in results if r.finished]
    if not done:
        return None
    return sum(r.get("wall_seconds") or r["train_seconds"] for r in done) / sum(r["tokens"] for r in done)


# ---- result files ----------------------------------------------------------------------------------
NUMBER_LIST = re.compile(r"\[\s*([-+\d.eE,\s]+?)\s*\]")  # [1, 2.5e-3] on one line: the curves stay short
SETUP_KEYS = ("model", "batch_size", "seq_len", "valid_tokens", "passage_chars")


def result_path(results_dir, run: Run) -> Path:
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


# ---- running ---------------------------------------------------------------------------------------
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
    return command


def setup_of(args) -> dict:
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
    print(f"[quality] stage {name}: {len(runs)} run(s): {', '.join(r.name for r in runs)}", flush=True)
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda r: execute(r, args), runs):
            ppl = f"ppl {result.ppl:.1f}" if result.finished else "diverged"
            print(f"[quality] {datetime.datetime.now():%Y-%m-%d %H:%M} {result.run.name}: {ppl}", flush=True)
            results.append(result)
    return results


def plan_kw(args, methods) -> dict:
    return {"methods": methods, "budgets": args.budgets, "seeds": args.seeds, "max_extensions": args.max_extensions,
            "grids": args.grids, "tune_full": args.tune_full}


def plan_and_run(args, methods) -> list[Result]:
    """Run the next stage's missing runs until no stage has any."""
    while True:
        results = read_results(args.results, setup_of(args))
        step = next_stage(results, **plan_kw(args, methods))
        if step is None:
            return results
        run_stage(*step, args)


# ---- the report ------------------------------------------------------------------------------------
def final_rows(results: list[Result], tokens: int, rows) -> dict[str, dict]:
    """row -> its best seed-0 configuration at ``tokens`` and that configuration's finished runs over seeds."""
    out = {}
    for row in rows:
        best = best_run(results, row, tokens)
        if best is None:
            continue
        runs = sorted((r for r in results if r.run.config() == best.config() and r.run.tokens == tokens),
                      key=lambda r: r.run.seed)
        out[row] = {"run": best, "runs": runs, "ppl": statistics.mean(r.ppl for r in runs)}
    return out


def ratio_series(results: list[Result], rows, base: str = "full") -> dict[str, list[tuple[int, float]]]:
    """row -> [(tokens, its perplexity / ``base``'s)] at every budget where both have a finished result."""
    series = {}
    for tokens in sorted({r.run.tokens for r in results}):
        table = final_rows(results, tokens, rows)
        if base not in table or not math.isfinite(table[base]["ppl"]):
            continue
        for row, data in table.items():
            if row != base and math.isfinite(data["ppl"]):
                series.setdefault(row, []).append((tokens, data["ppl"] / table[base]["ppl"]))
    return series


def verdict(table: dict, tokens: int) -> list[str]:
    """The study's targets at this budget, each stated as met or not."""
    if "full" not in table:
        return [f"no full-rank result at {tokens:,} tokens yet."]
    full = table["full"]
    if not math.isfinite(full["ppl"]):
        return [f"full-rank diverged at {tokens:,} tokens."]
    full_linear = full["runs"][0].record["linear_parameters"]
    cands = {m: r for m, r in table.items() if m in STRUCTURED and math.isfinite(r["ppl"])}
    if not cands:
        return ["no SLTrain / LOST / CoLA result yet."]
    method, best = min(cands.items(), key=lambda kv: kv[1]["ppl"])
    ratio = best["ppl"] / full["ppl"]
    share = best["runs"][0].record["linear_parameters"] / full_linear
    met = ratio <= 1.02 and share <= 0.45
    lines = [(f"Best of SLTrain / LOST / CoLA within 2% of the tuned full-rank perplexity (or better) with at most 45% "
              f"of its linear-layer parameters: **{'met' if met else 'not met'}** -- {method} at {best['ppl']:.1f} "
              f"against {full['ppl']:.1f}, {ratio:.3f}x, with {share:.2f}x the linear parameters.")]
    if "lowrank" in table:
        low = table["lowrank"]["ppl"]
        worse = low >= 1.05 * best["ppl"]
        lines.append(f"Low-rank visibly worse (at least 5% above that best): **{'met' if worse else 'not met'}** -- "
                     f"{low:.1f}, {low / best['ppl']:.3f}x {method} and {low / full['ppl']:.3f}x full-rank.")
    return lines


def _fmt_tokens(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 10**6 else f"{tokens:,}"


def report(results: list[Result], args, methods) -> str:
    finished = results  # diverged runs too: they are part of the sweeps
    rows = rows_of(methods) if "full" in methods else list(methods)
    budgets = sorted({r.run.tokens for r in finished})
    if not budgets:
        return "No finished runs yet."
    short, longest = budgets[0], budgets[-1]
    setup = next((r.record["setup"] for r in finished), {})
    left = runs_left_estimate(results, **plan_kw(args, methods))
    step = next_stage(results, **plan_kw(args, methods))
    intro = (
        f"`{setup.get('model', args.model)}` shapes, batch {setup.get('batch_size')} x {setup.get('seq_len')} tokens, "
        f"fp32 on CPU, every method with recipes/pretrain.py's defaults except where named (rank 1/4 of d, SLTrain δ "
        f"0.03, LOST ρ 0.05, γ 0.5, CoLA with its own weight decay 0.01 and clipping 0.5; cosine schedule with 10% "
        f"warm-up, clipping at 1.0). Training data: the corpus's `train/*.txt` (public-domain books, about 8.7M tokens "
        f"with the 8k tokenizer trained on it: 8M tokens is just under one epoch, no passage seen twice); perplexity on "
        f"{setup.get('valid_tokens', 0):,} tokens of its `valid/*.txt` (other books); both cut into shuffled passages "
        f"of about {setup.get('passage_chars', 0):,} characters (recipes/bench/passages.py). Each method's "
        f"configuration is the best of its sweep at {_fmt_tokens(short)} tokens (seed 0); at the longest budget its "
        f"rate is re-checked at x0.5 and x2 and the best of the three is run with a second seed; the figure is the "
        f"mean over seeds (each seed's value in brackets). **full** is full-rank AdamW tuned on its rate, the "
        f"embeddings'/head's rate against the linear layers' (`--linear-lr-scale`), warmup and init scale (its "
        f"tuning is below); **{FULL_ONE_LR}** is full-rank at its best single rate with the recipe's other settings. "
        f"*Linear params* counts the weights of the q, k, v, o, gate, up, down layers. Peak memory is the whole "
        f"process's peak RSS (libraries included; the model's own memory is in the memory section); tokens/s is the "
        f"median training step **measured on a shared 2-core machine** with other jobs running, so it is a rough "
        f"guide only (the step benchmark is the speed reference)."
    )
    pace, tokens_left = seconds_per_token(finished), tokens_left_estimate(results, **plan_kw(args, methods))
    eta = (f" At the pace so far ({pace * 1e6 / 60:.0f} minutes per 1M tokens, one run at a time at the lowest priority "
           f"on the shared machine), the {tokens_left / 1e6:.0f}M tokens left take about {pace * tokens_left / 3600:.0f} "
           f"hours." if pace and step else "")
    progress = (
        f"**Progress: {len(finished)} run{'s' if len(finished) != 1 else ''} finished, "
        + (f"about {left} to go; the study continues.**{eta} Next stage: {step[0]} ({len(step[1])} run(s)). "
           if step else "the study is complete.** ")
        + "Each run's result is in `docs/benchmarks/quality/`; the study resumes from there on any checkout "
        "(`nohup nice -n 19 python -m recipes.bench.quality --jobs 1 --commit-results --data-files "
        "'<corpus>/train/*.txt' --valid-files '<corpus>/valid/*.txt' > /tmp/quality-study.log 2>&1 &`)."
    )
    lines = [intro, "", progress, "", PRIOR,
        "",
    ]
    complete = step is None
    tables = {t: final_rows(finished, t, rows) for t in budgets}
    judged = next((t for t in reversed(budgets) if "full" in tables[t] and any(m in tables[t] for m in STRUCTURED)), None)
    if judged is not None:
        status = ("final" if complete else "provisional: " + ("the study has not reached its longest budget"
                                                                  if judged != max(args.budgets) else
                                                                  "the rate re-check or the second seed is still to run"))
        lines += [f"### Targets at {_fmt_tokens(judged)} tokens ({status})", ""]
        lines += [f"- {v}" for v in verdict(tables[judged], judged)] + [""]
    series = ratio_series(finished, rows)
    if series:
        lines += ["### Perplexity against tuned full-rank, by budget", "",
                  "| method | " + " | ".join(_fmt_tokens(t) for t in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for row in rows:
            if row in series:
                by = dict(series[row])
                lines.append(f"| {row} | " + " | ".join(f"{by[t]:.3f}" if t in by else "-" for t in budgets) + " |")
        lines += ["", _trend(series, budgets), ""]
    for tokens in budgets:
        table = tables[tokens]
        base = table.get("full")
        full_linear = base["runs"][0].record["linear_parameters"] if base and base["runs"][0].finished else None
        lines += [f"### {tokens:,} training tokens", "",
                  "| method | configuration | valid ppl | vs full | linear params | vs full | total params | peak RSS (MiB) | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row, data in table.items():
            if row == FULL_ONE_LR and base and data["run"] == base["run"]:
                lines.append(f"| {row} | (the same run as full) | | | | | | | |")
                continue
            ok = [r for r in data["runs"] if r.finished]
            seeds = ", ".join(f"{r.ppl:.1f}" for r in data["runs"])
            if not ok:
                lines.append(f"| {row} | {data['run'].label()} | diverged | - | - | - | - | - | - |")
                continue
            rec = ok[0].record
            ratio = f"{data['ppl'] / base['ppl']:.3f}" if base else "-"
            share = f"{rec['linear_parameters'] / full_linear:.2f}" if full_linear else "-"
            speeds = [r.record["tokens_per_s"] for r in ok if r.record.get("tokens_per_s")]
            speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
            memory = max(r.record["peak_memory_mib"] for r in ok)
            lines.append(f"| {row} | {data['run'].label()} | {data['ppl']:.1f} ({seeds}) | {ratio} | "
                         f"{rec['linear_parameters'] / 1e6:.2f}M | {share} | {rec['parameters']['total'] / 1e6:.2f}M | "
                         f"{memory:,.0f} | {speed} |")
        lines.append("")
    lines += _full_tuning(finished, short)
    lines += [f"### Learning-rate sweep ({_fmt_tokens(short)} tokens, seed 0; valid ppl, inf = diverged)", "",
              "| method | learning rate: valid ppl |", "|---|---|"]
    for m in methods:
        tried = sorted((r for r in finished if (r.run.method, r.run.seed, r.run.tokens) == (m, 0, short) and r.run.one_lr),
                       key=lambda r: r.run.lr)
        if tried:
            lines.append(f"| {m} | " + ", ".join(f"{r.run.lr:g}: {r.ppl:.1f}" for r in tried) + " |")
    lines.append("")
    if longest != short:
        recheck = []
        for row in rows:
            if row == FULL_ONE_LR or best_run(finished, row, short) is None:
                continue
            best = best_run(finished, row, short).at(tokens=longest)
            got = {r.run.lr: r.ppl for r in candidates(finished, row, longest) if r.run.config()[2:] == best.config()[2:]}
            cells = [f"{got[round_lr(best.lr * f)]:.1f}" if round_lr(best.lr * f) in got else "-" for f in (0.5, 1, 2)]
            if any(c != "-" for c in cells):
                recheck.append(f"| {row} | {best.label()} | " + " | ".join(cells) + " |")
        if recheck:
            lines += [f"### The rate re-checked at {_fmt_tokens(longest)} tokens (seed 0; valid ppl)", "",
                      "| method | configuration of the sweep | rate x0.5 | x1 | x2 |", "|---|---|---|---|---|", *recheck, ""]
    return "\n".join(lines)


def _trend(series: dict, budgets: list[int]) -> str:
    best = []
    for tokens in budgets:
        here = [(ratio, row) for row, points in series.items() for t, ratio in points if t == tokens and row in STRUCTURED]
        if here:
            best.append((tokens, *min(here)))
    if len(best) < 2:
        return "The trend with budget needs a second budget."
    path = " -> ".join(f"{r:.3f} ({row}, {_fmt_tokens(t)})" for t, r, row in best)
    first, last = best[0][1], best[-1][1]
    if abs(last - first) < 0.01:
        way = "stays within 0.01 of where it started"
    else:
        way = ("moves toward" if abs(last - 1) < abs(first - 1) else "moves away from") + " full-rank's perplexity"
        way += f" ({'rising' if last > first else 'falling'} by {abs(last - first):.3f})"
    text = f"Trend: the best of SLTrain / LOST / CoLA against tuned full-rank goes {path}: it {way} as the budget grows."
    if "lowrank" in series and len(series["lowrank"]) >= 2:
        lr = series["lowrank"]
        text += f" Low-rank: {lr[0][1]:.3f} ({_fmt_tokens(lr[0][0])}) -> {lr[-1][1]:.3f} ({_fmt_tokens(lr[-1][0])})."
    if FULL_ONE_LR in series and len(series[FULL_ONE_LR]) >= 1:
        one = series[FULL_ONE_LR]
        text += (" Full-rank at one rate against tuned: " + ", ".join(f"{r:.3f} ({_fmt_tokens(t)})" for t, r in one) + ".")
    return text


def _full_tuning(results: list[Result], short: int) -> list[str]:
    """What moves full-rank at the short budget: each knob's runs, and the best after each stage."""
    mine = sorted((r for r in results if (r.run.method, r.run.seed, r.run.tokens) == ("full", 0, short)),
                  key=lambda r: r.run.name)
    if not mine:
        return []
    lines = [f"### Full-rank tuning ({_fmt_tokens(short)} tokens, seed 0; valid ppl)", "",
             "| knob | configuration | valid ppl |", "|---|---|---|"]
    groups = [("rate", lambda r: r.one_lr),
              ("split (`--linear-lr-scale`)", lambda r: r.linear_lr_scale != 1 and r.warmup is None and r.init_range is None),
              ("warmup", lambda r: r.warmup is not None and r.init_range is None),
              ("init scale", lambda r: r.init_range is not None)]
    steps, pool = [], []
    for knob, test in groups:
        these = sorted((r for r in mine if test(r.run)), key=lambda r: (r.run.lr, r.run.linear_lr_scale))
        for r in these:
            lines.append(f"| {knob} | {r.run.label()} | {r.ppl:.1f} |")
        pool += these
        if these:
            best = min(pool, key=lambda r: r.ppl)
            steps.append((knob, best))
    lines.append("")
    if steps:
        base = steps[0][1].ppl
        moves = "; ".join(f"after the {knob}: {b.ppl:.1f} ({b.ppl / base - 1:+.1%}, {b.run.label()})" for knob, b in steps)
        lines += [f"What moves it (best so far after each knob, against its best single rate): {moves}.", ""]
    return lines


def plot_ratios(series: dict, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (row, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", linestyle=":" if row == FULL_ONE_LR else "-", label=row)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(1.02, color="gray", linewidth=1, linestyle="--", label="target: 1.02")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("valid perplexity / tuned full-rank's")
    ax.set_title("Each method against tuned full-rank AdamW")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plot_curves(table: dict, tokens: int, target: Path, model: str) -> Path:
    """Training (thinned) and validation loss of each row's seed-0 run at one budget, from the result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (row, data) in enumerate(table.items()):
        rec = data["runs"][0].record
        if not data["runs"][0].finished or (row == FULL_ONE_LR and "full" in table and data["run"] == table["full"]["run"]):
            continue
        color = f"C{i % 10}"
        if rec.get("train_loss"):
            ax.plot(*zip(*rec["train_loss"]), color=color, alpha=0.6, linewidth=1.0)
        if rec.get("eval"):
            ax.plot([e[1] for e in rec["eval"]], [e[2] for e in rec["eval"]], color=color, linestyle="--", marker="o",
                    markersize=3, label=f"{row} ({data['run'].label()}): ppl {rec['final_val_ppl']:.1f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token); line: train, dashed: valid")
    ax.set_title(f"{model}, {tokens:,} tokens of the corpus (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


# ---- the command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from recipes.flags import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(GRIDS), help="methods to compare (default: all)")
    p.add_argument("--model", default="llama_20m", help="a name in recipes/configs (default: %(default)s)")
    p.add_argument("--budgets", nargs="+", type=parse_size, default=[1_000_000, 2_000_000, 4_000_000, 8_000_000],
                   help="token budgets; the sweep runs at the shortest, the rate re-check and the seeds at the longest "
                        "(default: 1M 2M 4M 8M)")
    p.add_argument("--seeds", type=int, default=2, help="seeds at the longest budget (default: 2)")
    p.add_argument("--max-extensions", type=int, default=2, help="grid extensions per method at its edges (default: 2)")
    p.add_argument("--no-tune-full", dest="tune_full", action="store_false",
                   help="skip full-rank's split, warmup and init-scale stages")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step: more updates per token at these small budgets (default: 4)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--valid-tokens", type=int, default=65_536)
    p.add_argument("--eval-every", type=int, default=125, help="validate at least every N steps, about 8 times a run (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps, to resume (default: %(default)s)")
    p.add_argument("--data-files", help="training text files (glob), e.g. corpus/train/*.txt; required to run")
    p.add_argument("--valid-files", help="validation text files (glob), e.g. corpus/valid/*.txt; required to run")
    p.add_argument("--passage-chars", type=int, default=4000,
                   help="train and validate on the files cut into shuffled passages of about this many characters "
                        "(recipes/bench/passages.py; default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default: %(default)s)")
    p.add_argument("--threads", type=int, help="threads per run (default: cores / --jobs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="run directories, untracked (default: runs/quality)")
    p.add_argument("--results", help="result files, one per finished run (default: docs/benchmarks/quality; "
                                     "with --quick, <--out>/results)")
    p.add_argument("--figures", default=str(FIGURES), help="where the PNGs go (default: docs/benchmarks)")
    p.add_argument("--commit-results", action="store_true",
                   help="git-commit each result file as its run finishes (that file only)")
    p.add_argument("--report-only", action="store_true", help="report the result files; start no run")
    p.add_argument("--plan", action="store_true", help="print the next stage's runs and the runs left; start none")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: llama_9m, full and LOST x 2 rates, a few thousand tokens (a few minutes)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md and the PNGs alone")
    return p


def main(argv=None) -> list[Result]:
    parser = build_parser()
    args = parser.parse_args(argv)
    offline = args.report_only or args.plan
    if not offline and not (args.data_files and args.valid_files):
        missing = " and ".join(f for f, v in (("--data-files", args.data_files), ("--valid-files", args.valid_files)) if not v)
        parser.error(f"{missing} required: the corpus to train and validate on, as text-file globs "
                     f"(e.g. --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt'); the study has no "
                     f"default corpus. --report-only needs neither.")
    args.grids = dict(QUICK_GRIDS) if args.quick else dict(GRIDS)
    if args.quick:
        args.model, args.budgets, args.batch_size, args.seq_len = "llama_9m", [2048, 4096], 4, 64
        args.valid_tokens, args.eval_every, args.max_extensions, args.tune_full = 2048, 4, 0, False
        args.results = args.results or str(Path(args.out) / "results")
    args.results = args.results or str(RESULTS)
    methods = list(args.methods or args.grids)
    if args.quick and args.methods:
        args.grids = {m: GRIDS[m] for m in methods}
    if "galore" in methods:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore-torch is not installed (pip install -e '.[galore]'): leaving GaLore out", file=sys.stderr)
            methods.remove("galore")
    for flag in ("seeds", "jobs"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    if min(args.budgets) < 1:
        raise SystemExit(f"--budgets must be positive token counts; got {args.budgets}")
    args.threads = args.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1) // args.jobs)
    if args.plan:
        results = read_results(args.results)
        step = next_stage(results, **plan_kw(args, methods))
        print(f"{len(results)} result(s) in {args.results}; about {runs_left_estimate(results, **plan_kw(args, methods))} run(s) to go")
        print("next stage:", "none (done)" if step is None else f"{step[0]}: " + ", ".join(r.name for r in step[1]))
        return results
    if args.report_only:
        results = read_results(args.results)
    else:
        from recipes.bench.passages import write_passages

        corpus = Path(args.out) / "corpus"
        args.train_passages = write_passages(args.data_files, corpus / "train", shards=TRAIN_SHARDS,
                                             passage_chars=args.passage_chars)
        args.valid_passages = write_passages(args.valid_files, corpus / "valid", shards=1, passage_chars=args.passage_chars)
        results = plan_and_run(args, methods)
    if not results:
        raise SystemExit(f"no finished runs in {args.results}")
    table = report(results, args, methods)
    print(table)
    if not args.no_write:
        rows = rows_of(methods) if "full" in methods else list(methods)
        finished = [r for r in results if r.finished]
        figures = []
        series = ratio_series(finished, rows)
        if series:
            figures.append(("perplexity against tuned full-rank", plot_ratios(series, Path(args.figures) / "quality_ratio.png")))
        for tokens in sorted({r.run.tokens for r in finished}):
            curves = final_rows(finished, tokens, rows)
            target = Path(args.figures) / f"quality_{tokens}tok.png"
            figures.append((f"loss curves, {tokens:,} tokens", plot_curves(curves, tokens, target, args.model)))
        docs = ROOT / "docs"
        table += "\n\n" + "\n".join(f"![{alt}]({os.path.relpath(p, docs)})" for alt, p in figures)
        from recipes.bench.report import write_section

        print("wrote", write_section("quality", "Quality: which method wins as the budget grows", table))
    return results


if __name__ == "__main__":
    main()
