"""The quality study's command line: ``python -m recipes.bench.quality`` (the flags are in :func:`build_parser`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recipes.bench import ROOT
from recipes.bench import quality as study
from recipes.bench.quality.execute import plan_and_run
from recipes.bench.quality.plan import (
    GRIDS,
    QUICK_GRIDS,
    Result,
    next_stage,
    plan_kw,
    runs_left_estimate,
)
from recipes.bench.quality.plots import write_figures
from recipes.bench.quality.report import report
from recipes.bench.quality.results import read_results

FIGURES = ROOT / "docs" / "benchmarks"
RESULTS = FIGURES / "quality"
TRAIN_SHARDS = 8  # of about 1M tokens each: a run's shard order still depends on its seed
BUDGETS = [1_000_000, 2_000_000, 4_000_000]  # 8M does not fit the shared machine's time; the goal asks for 4M


def build_parser() -> argparse.ArgumentParser:
    """The study's flags; the package docstring is the help's description."""
    from recipes.flags import parse_size

    p = argparse.ArgumentParser(prog="python -m recipes.bench.quality", description=study.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(GRIDS), help="methods to compare (default: all)")
    p.add_argument("--model", default="llama_20m", help="a name in recipes/configs (default: %(default)s)")
    p.add_argument("--budgets", nargs="+", type=parse_size, default=list(BUDGETS),
                   help="token budgets; the sweep runs at the shortest, the rate re-check and the seeds at the longest "
                        "(default: 1M 2M 4M)")
    p.add_argument("--seeds", type=int, default=2, help="seeds at the longest budget (default: 2)")
    p.add_argument("--max-extensions", type=int, default=2, help="grid extensions per method at its edges (default: 2)")
    p.add_argument("--no-tune-full", dest="tune_full", action="store_false",
                   help="skip full-rank's split, warmup and init-scale stages, and the other methods' split")
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


def _settle(parser: argparse.ArgumentParser, args) -> list[str]:
    """Check the flags and fill in what they imply (``--quick``'s small setup, the grids, the threads);
    returns the methods to compare."""
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
    return methods


def main(argv=None) -> list[Result]:
    """Run the study (or with ``--plan`` / ``--report-only`` read its result files), print the report and,
    unless ``--no-write``, write it and its figures into docs/benchmarks.md and docs/benchmarks/."""
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = _settle(parser, args)
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
        figures = write_figures(results, methods, Path(args.figures), args.model)
        docs = ROOT / "docs"
        table += "\n\n" + "\n".join(f"![{alt}]({os.path.relpath(p, docs)})" for alt, p in figures)
        from recipes.bench.report import write_section

        print("wrote", write_section("quality", "Quality: which method wins as the budget grows", table))
    return results
