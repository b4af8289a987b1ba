"""Quality: validation perplexity of every method at the same token budget, on the real corpus.

A small LLaMA (``llama_20m`` shapes: d = 256, 4 layers; 7.4M parameters with the 8k tokenizer trained on
the corpus) is trained by ``recipes/pretrain.py`` with each method for the same number of tokens:

1. **sweep**: every method at each learning rate of its grid (seed 0, the short budget); where the best
   rate sits on the edge of the grid, the grid is extended by one more factor of 2 (at most twice), so
   no method is judged at a rate that was too low or too high;
2. **seeds**: the best rate of each method again with the other seeds;
3. **long budget**: the best rates at ``--long-factor`` x the tokens, every seed (the papers' claim is
   about long training: judge the target there, and report how the gap moves between the budgets).

Each run is a fresh ``pretrain.py`` process (its own peak memory) writing into ``--out/<run name>``; a
run that has its ``summary.json`` is never run again, and an interrupted one resumes from its last
checkpoint, so the whole study can be spread over several sittings. The report (tables, targets and
loss curves) goes into docs/benchmarks.md and docs/benchmarks/; ``--report-only`` writes it from the
runs that exist without starting any.

    python -m recipes.bench.quality --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt'
                                                          # the full study (hours on 2 cores)
    python -m recipes.bench.quality --report-only         # the report from the runs done so far
    python -m recipes.bench.quality --quick --no-write --data-files ... --valid-files ...   # a one-minute smoke test

``--data-files`` and ``--valid-files`` (text-file globs) are required except with ``--report-only``: the
study ships no corpus.
"""

from __future__ import annotations


import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from recipes.bench import ROOT

PRETRAIN = ROOT / "recipes" / "pretrain.py"
FIGURES = ROOT / "docs" / "benchmarks"

# Learning-rate grids, factors of 2 around each method's recipe default. The full-rank grid sits lower:
# a quick calibration on this corpus found its best rate 3x below that of SLTrain and LOST.
GRIDS = {
    "full": [5e-4, 1e-3, 2e-3],
    "lowrank": [1.5e-3, 3e-3, 6e-3],
    "sltrain": [1.5e-3, 3e-3, 6e-3],
    "lost": [1.5e-3, 3e-3, 6e-3],
    "lost-silu": [1.5e-3, 3e-3, 6e-3],
    "galore": [5e-3, 1e-2, 2e-2],
}
QUICK_GRIDS = {"full": [1e-3, 3e-3], "lost": [3e-3, 1e-2]}
TRAIN_SHARDS = 8  # of about 1M tokens each: a run's shard order still depends on its seed


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-seed{self.seed}-{self.tokens}tok"


@dataclass
class Result:
    run: Run
    ppl: float  # final validation perplexity; inf when the run diverged
    summary: dict | None  # pretrain.py's summary.json, None when the run failed
    tokens_per_s: float | None  # median over training steps, robust to a paused or shared machine


def best_lr(results: list[Result], method: str, seed: int, tokens: int) -> float | None:
    """The learning rate with the lowest perplexity among ``method``'s runs at this seed and budget."""
    mine = [r for r in results if (r.run.method, r.run.seed, r.run.tokens) == (method, seed, tokens)]
    return min(mine, key=lambda r: (r.ppl, r.run.lr)).run.lr if mine else None


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
        return best * factor
    if best == rates[0]:
        return best / factor
    return None


def median_tokens_per_s(run_dir: Path, tokens_per_step: int) -> float | None:
    """Tokens per second of the median training step, from the cumulative step times in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    times = [r["time"] for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "train"]
    steps = [b - a for a, b in zip(times, times[1:]) if b > a]  # a resumed run restarts its clock: skip that step
    return tokens_per_step / statistics.median(steps) if steps else None


def load_result(run: Run, out: Path) -> Result | None:
    """The result of a finished run (``summary.json`` or a recorded failure), else None."""
    run_dir = out / run.name
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        per_step = summary["tokens"] // max(1, summary["steps"])
        return Result(run, summary["final_val_ppl"], summary, median_tokens_per_s(run_dir, per_step))
    if (run_dir / "failed.txt").exists():
        return Result(run, math.inf, None, None)
    return None


def execute(run: Run, out: Path, args) -> Result:
    """Train one run in a fresh process (resuming its checkpoint if an earlier attempt was interrupted)."""
    done = load_result(run, out)
    if done is not None:
        return done
    run_dir = out / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(PRETRAIN), "--model", args.model, "--method", run.method, "--lr", repr(run.lr),
        "--seed", str(run.seed), "--tokens", str(run.tokens), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--data-files", args.train_passages, "--valid-files", args.valid_passages,
        "--valid-tokens", str(args.valid_tokens), "--cache-dir", str(out / "cache"), "--out", str(run_dir),
        "--eval-every", str(args.eval_every), "--save-every", str(args.save_every), "--keep", "1",
        "--resume", "auto", "--threads", str(args.threads),
    ]
    with open(run_dir / "run.log", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if code:
        text = (run_dir / "run.log").read_text()
        if "FloatingPointError" not in text:  # a crash is a bug to fix, not a result
            raise RuntimeError(f"run {run.name} failed (exit {code}); see {run_dir / 'run.log'}:\n{text[-2000:]}")
        (run_dir / "failed.txt").write_text("diverged: the loss became non-finite\n")
    return load_result(run, out)


def run_all(runs: list[Run], out: Path, args, stage: str) -> list[Result]:
    from tqdm import tqdm

    todo = [r for r in runs if load_result(r, out) is None]
    results = [load_result(r, out) for r in runs if r not in todo]
    if not todo:
        return results
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc=stage, unit="run") as bar:
        for result in pool.map(lambda r: execute(r, out, args), todo):
            results.append(result)
            bar.set_postfix_str(f"{result.run.name}: ppl {result.ppl:.1f}")
            bar.update(1)
    return results


def plan_and_run(args, grids: dict[str, list[float]]) -> list[Result]:
    """Sweep, extend the grid at its edges, repeat the best rates over seeds, then the long budget."""
    out, short, long = Path(args.out), args.tokens, args.tokens * args.long_factor
    results = run_all([Run(m, lr, 0, short) for m, grid in grids.items() for lr in grid], out, args, "sweep")
    for _ in range(args.max_extensions):
        extra = []
        for method in grids:
            tried = {r.run.lr: r.ppl for r in results if (r.run.method, r.run.seed, r.run.tokens) == (method, 0, short)}
            lr = edge_extension(tried)
            if lr is not None:
                extra.append(Run(method, lr, 0, short))
        if not extra:
            break
        results += run_all(extra, out, args, "grid edges")
    best = {m: best_lr(results, m, 0, short) for m in grids}
    seeds = range(args.seeds)
    results += run_all([Run(m, best[m], s, short) for m in grids for s in seeds if s > 0], out, args, "seeds")
    if args.long_factor > 1:
        for seed in range(args.long_seeds or args.seeds):  # every method's seed 0 first, so a partial study already compares them all
            results += run_all([Run(m, best[m], seed, long) for m in grids], out, args, f"long budget, seed {seed}")
    return results


def collect(args, grids: dict[str, list[float]]) -> list[Result]:
    """Every finished run in ``--out`` for these methods and budgets (for --report-only)."""
    results = []
    budgets = (args.tokens, args.tokens * args.long_factor)
    for run_dir in sorted(Path(args.out).glob("*-lr*-seed*-*tok")):
        method, rest = run_dir.name.split("-lr")
        lr, rest = rest.split("-seed")
        seed, tokens = rest.split("-")
        run = Run(method, float(lr), int(seed), int(tokens.removesuffix("tok")))
        if method in grids and run.tokens in budgets:
            result = load_result(run, Path(args.out))
            if result is not None:
                results.append(result)
    return results


def linear_parameters(summary: dict) -> int:
    p = summary["parameters"]
    return p["dense_linear"] + p["lowrank_factors"] + p["sparse"] + p.get("other_factors", 0)  # older summaries lack it


def final_rows(results: list[Result], tokens: int, methods) -> dict[str, dict]:
    """method -> the best seed-0 rate at the short budget and its results over seeds at ``tokens``."""
    short = min(r.run.tokens for r in results)
    rows = {}
    for method in methods:
        lr = best_lr(results, method, 0, short)
        runs = sorted((r for r in results if r.run.method == method and r.run.lr == lr and r.run.tokens == tokens
                       and r.summary is not None), key=lambda r: r.run.seed)
        if runs:
            rows[method] = {"lr": lr, "runs": runs, "ppl": statistics.mean(r.ppl for r in runs)}
    return rows


def report(results: list[Result], args, grids: dict[str, list[float]]) -> str:
    short = args.tokens
    budgets = [b for b in (short, short * args.long_factor) if any(r.run.tokens == b for r in results)]
    lines = [
        f"`{args.model}` shapes, batch {args.batch_size} x {args.seq_len} tokens, fp32 on CPU, every method "
        f"with recipes/pretrain.py's defaults except the learning rate (rank 1/4 of d, SLTrain δ 0.03, LOST ρ 0.05, "
        f"γ 0.5; cosine schedule with 10% warm-up, clipping at 1.0). Training data: `{args.data_files or 'as given to the runs'}`; "
        f"perplexity on {args.valid_tokens:,} tokens of `{args.valid_files or 'the validation files given to the runs'}`; both cut into passages of about "
        f"{args.passage_chars:,} characters (whole paragraphs) and shuffled with a fixed seed "
        f"(recipes/bench/passages.py), so that every run, however short, samples every book. The learning rate of each method is "
        f"the best of its sweep at {short:,} tokens, seed 0; the final figures are the mean over seeds "
        f"(each seed's value in brackets). *Linear params* counts the weights of the q, k, v, o, gate, up, down "
        f"layers against full-rank's. Peak memory is the whole process's peak RSS (libraries included: the "
        f"model's own memory is in the step benchmark); tokens/s is the median training step with "
        f"{args.jobs} runs sharing the machine.",
        "",
    ]
    lines += [f"Finished runs so far: {len(results)} (the study resumes where it stopped; `--report-only` re-reads them).", ""]
    full_linear = next((linear_parameters(r.summary) for r in results if r.run.method == "full" and r.summary), None)
    verdicts = []
    for tokens in budgets:
        rows = final_rows(results, tokens, grids)
        base = rows.get("full")
        lines += [f"### {tokens:,} training tokens", "",
                  "| method | lr | valid ppl | vs full-rank | linear params | vs full-rank | total params | peak RSS (MiB) | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            first = row["runs"][0]
            seeds = ", ".join(f"{r.ppl:.1f}" for r in row["runs"])
            linear = linear_parameters(first.summary)
            ratio = f"{row['ppl'] / base['ppl']:.3f}" if base else "-"
            share = f"{linear / full_linear:.2f}" if full_linear else "-"
            speeds = [r.tokens_per_s for r in row["runs"] if r.tokens_per_s]
            speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
            memory = max(r.summary["peak_memory_mib"] for r in row["runs"])
            lines.append(
                f"| {method} | {row['lr']:g} | {row['ppl']:.1f} ({seeds}) | {ratio} | {linear / 1e6:.2f}M | {share} | "
                f"{first.summary['parameters']['total'] / 1e6:.2f}M | {memory:,.0f} | {speed} |")
        lines.append("")
        if base and full_linear:
            verdicts.append((tokens, best_structured(rows, base["ppl"], full_linear)))
    if verdicts:
        tokens, verdict = verdicts[-1]
        lines += [f"At the longest budget so far ({tokens:,} tokens): {verdict}", ""]
    lines += [f"### Learning-rate sweep (seed 0, {short:,} tokens; valid ppl, inf = diverged)", "",
              "| method | learning rate: valid ppl |", "|---|---|"]
    for method in grids:
        tried = sorted((r for r in results if (r.run.method, r.run.seed, r.run.tokens) == (method, 0, short)),
                       key=lambda r: r.run.lr)
        if tried:
            lines.append(f"| {method} | " + ", ".join(f"{r.run.lr:g}: {r.ppl:.1f}" for r in tried) + " |")
    return "\n".join(lines)


def best_structured(rows: dict, full_ppl: float, full_linear: int) -> str:
    """The best of SLTrain / LOST against full-rank (perplexity and linear parameters), and whether
    low-rank is worse than both, as the papers find."""
    candidates = {m: r for m, r in rows.items() if m in ("sltrain", "lost", "lost-silu")}
    if not candidates:
        return "no SLTrain or LOST run yet."
    method, row = min(candidates.items(), key=lambda kv: kv[1]["ppl"])
    share = linear_parameters(row["runs"][0].summary) / full_linear
    ratio = row["ppl"] / full_ppl
    text = (f"best of SLTrain / LOST is **{method}** at {ratio:.3f}x full-rank perplexity with {share:.2f}x its "
            f"linear parameters")
    if "lowrank" in rows:
        worse = all(rows["lowrank"]["ppl"] > r["ppl"] for m, r in candidates.items() if m in ("sltrain", "lost"))
        text += f"; low-rank ({rows['lowrank']['ppl']:.1f}) {'is' if worse else 'is not'} worse than SLTrain and LOST."
    return text


def plot(results: list[Result], args, grids) -> list[Path]:
    """One loss-curve figure per budget: each method's best rate, seed 0."""
    from recipes.plot import plot_runs

    paths = []
    for tokens in sorted({r.run.tokens for r in results}):
        rows = final_rows(results, tokens, grids)
        if not rows:
            continue
        dirs = [Path(args.out) / row["runs"][0].run.name for row in rows.values()]
        labels = [f"{m} lr {row['lr']:g}" for m, row in rows.items()]
        target = Path(args.figures) / f"quality_{tokens}tok.png"
        paths.append(plot_runs(dirs, target, labels=labels, smooth=10,
                               title=f"{args.model}, {tokens:,} tokens of the corpus"))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(GRIDS), help="methods to compare (default: all)")
    p.add_argument("--model", default="llama_20m", help="a name in recipes/configs (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=500_000, help="short budget in tokens (default: %(default)s)")
    p.add_argument("--long-factor", type=int, default=2, help="long budget = this x --tokens; 1 skips it (default: 2)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the final comparison (default: 2)")
    p.add_argument("--long-seeds", type=int, help="seeds at the long budget (default: --seeds)")
    p.add_argument("--max-extensions", type=int, default=2, help="grid extensions per method at its edges (default: 2)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step: more updates per token at these small budgets (default: 4)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--valid-tokens", type=int, default=65_536)
    p.add_argument("--eval-every", type=int, default=125, help="validate every N steps (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps, to resume (default: 100)")
    p.add_argument("--data-files", help="training text files (glob), e.g. corpus/train/*.txt; required unless --report-only")
    p.add_argument("--valid-files", help="validation text files (glob), e.g. corpus/valid/*.txt; required unless --report-only")
    p.add_argument("--passage-chars", type=int, default=4000,
                   help="train and validate on the files cut into shuffled passages of about this many characters "
                        "(recipes/bench/passages.py; default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default: %(default)s)")
    p.add_argument("--threads", type=int, help="threads per run (default: cores / --jobs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="run directories (default: runs/quality)")
    p.add_argument("--figures", default=str(FIGURES), help="where the loss-curve PNGs go (default: docs/benchmarks)")
    p.add_argument("--report-only", action="store_true", help="report the finished runs in --out; start none")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: llama_9m, full and LOST x 2 rates, a few thousand tokens (about a minute)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p


def main(argv=None) -> list[Result]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.report_only and not (args.data_files and args.valid_files):
        missing = " and ".join(f for f, v in (("--data-files", args.data_files), ("--valid-files", args.valid_files)) if not v)
        parser.error(f"{missing} required: the corpus to train and validate on, as text-file globs "
                     f"(e.g. --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt'); the study has no "
                     f"default corpus. --report-only needs neither.")
    grids = dict(QUICK_GRIDS) if args.quick else dict(GRIDS)
    if args.quick:
        args.model, args.tokens, args.long_factor, args.batch_size, args.seq_len = "llama_9m", 2048, 2, 4, 64
        args.valid_tokens, args.eval_every, args.max_extensions, args.long_seeds = 2048, 4, 0, 1
    if args.methods:
        grids = {m: GRIDS[m] for m in args.methods}
    if "galore" in grids:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore-torch is not installed (pip install -e '.[galore]'): leaving GaLore out", file=sys.stderr)
            del grids["galore"]
    for flag in ("tokens", "long_factor", "seeds", "jobs"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    args.threads = args.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1) // args.jobs)
    if not args.report_only:
        from recipes.bench.passages import write_passages

        corpus = Path(args.out) / "corpus"
        args.train_passages = write_passages(args.data_files, corpus / "train", shards=TRAIN_SHARDS,
                                             passage_chars=args.passage_chars)
        args.valid_passages = write_passages(args.valid_files, corpus / "valid", shards=1, passage_chars=args.passage_chars)
    results = collect(args, grids) if args.report_only else plan_and_run(args, grids)
    if not results:
        raise SystemExit(f"no finished runs in {args.out}")
    table = report(results, args, grids)
    print(table)
    if not args.no_write:
        figures = plot(results, args, grids)
        table += "\n\n" + "\n".join(f"![loss curves]({p.relative_to(ROOT / 'docs')})" for p in figures)
        from recipes.bench.report import write_section

        print("wrote", write_section("quality", "Quality: validation perplexity at equal tokens", table))
    return results


if __name__ == "__main__":
    main()
