"""The quality study's report, from the result files alone: the tables, the targets and the trend.

Built from ``docs/benchmarks/quality/*.json`` only (no run directory), so ``--report-only`` works on any
checkout. The figures are in :mod:`recipes.bench.quality.plots`.
"""

from __future__ import annotations

import math
import statistics

from recipes.bench.quality.init_scale import why_section
from recipes.bench.quality.plan import (
    FULL_ONE_LR,
    MAX_SPLIT_EXTENSIONS,
    Result,
    Run,
    best_lr,
    best_run,
    candidates,
    next_stage,
    plan_kw,
    round_lr,
    rows_of,
    runs_left_estimate,
    seconds_per_token,
    tokens_left_estimate,
)
from recipes.bench.quality.step_size import step_section

STRUCTURED = ("sltrain", "lost", "lost-silu", "cola")  # the target's candidates (SLTrain / LOST / CoLA)
PRIOR = ("The earlier version of this study (the same setup; 500k and 1M tokens, 2 seeds; full-rank at one rate, "
         "the others at theirs; its runs are gone, its table is in the history of this file) had at 1M tokens: full-rank "
         "255.1, low-rank 238.3, SLTrain 157.7, LOST 176.8, LOST-SiLU 144.5, GaLore 158.6 -- SLTrain, LOST, LOST-SiLU "
         "and GaLore 31-43% below full-rank (low-rank 7% below), the reverse of the papers at their budgets and of Glentis et al. 2025 (arXiv "
         "2505.22922), who find a well-tuned full-rank model best. This study asks whether that survives fair "
         "tuning of full-rank and a growing budget.")


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
    """The study's section of docs/benchmarks.md (markdown), from ``results`` (diverged runs included: they
    are part of the sweeps)."""
    rows = rows_of(methods)
    budgets = sorted({r.run.tokens for r in results})
    if not budgets:
        return "No finished runs yet."
    short, longest = budgets[0], budgets[-1]
    step = next_stage(results, **plan_kw(args, methods))
    lines = [_intro(results, args, short), "", _progress(results, args, methods, step), "", PRIOR, ""]
    tables = {t: final_rows(results, t, rows) for t in budgets}
    judged = next((t for t in reversed(budgets) if "full" in tables[t] and any(m in tables[t] for m in STRUCTURED)), None)
    if judged is not None:
        status = ("final" if step is None else "provisional: " + ("the study has not reached its longest budget"
                                                                  if judged != max(args.budgets) else
                                                                  "the rate re-check or the second seed is still to run"))
        lines += [f"### Targets at {_fmt_tokens(judged)} tokens ({status})", ""]
        lines += [f"- {v}" for v in verdict(tables[judged], judged)] + [""]
    series = ratio_series(results, rows)
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
        lines += _budget_table(tables[tokens], tokens)
    lines += why_section(results, args.model, tables[short], short, _fmt_tokens(short))
    lines += step_section(args.results, _fmt_tokens(short))
    lines += _full_tuning(results, short)
    lines += _others_split(results, methods, short)
    lines += _sweep(results, methods, short)
    if longest != short:
        lines += _rate_recheck(results, rows, short, longest)
    return "\n".join(lines)


def _intro(results: list[Result], args, short: int) -> str:
    """The setup, in words, as the result files recorded it."""
    setup = next((r.record["setup"] for r in results), {})
    return (
        f"`{setup.get('model', args.model)}` shapes, batch {setup.get('batch_size')} x {setup.get('seq_len')} tokens, "
        f"fp32 on CPU, every method with recipes/pretrain.py's defaults except where named (rank 1/4 of d, SLTrain δ "
        f"0.03, LOST ρ 0.05, γ 0.5, CoLA with its own weight decay 0.01 and clipping 0.5; cosine schedule with 10% "
        f"warm-up, clipping at 1.0). Training data: the corpus's `train/*.txt` (public-domain books, about 8.7M tokens "
        f"with the 8k tokenizer trained on it: any budget up to 8M tokens stays under one epoch, no passage seen "
        f"twice); perplexity on "
        f"{setup.get('valid_tokens', 0):,} tokens of its `valid/*.txt` (other books); both cut into shuffled passages "
        f"of about {setup.get('passage_chars', 0):,} characters (recipes/bench/passages.py). Each method's "
        f"configuration is the best of its sweep and its split at {_fmt_tokens(short)} tokens (seed 0); at the longest budget its "
        f"rate is re-checked at x0.5 and x2 and the best of the three is run with a second seed; the figure is the "
        f"mean over seeds (each seed's value in brackets). **full** is full-rank AdamW tuned on its rate, the "
        f"embeddings'/head's rate against the linear layers' (`--linear-lr-scale`), warmup and its decoder's init scale (`--linear-init-std`; its "
        f"tuning is below); **{FULL_ONE_LR}** is full-rank at its best single rate with the recipe's other settings. "
        f"*Linear params* counts the weights of the q, k, v, o, gate, up, down layers. Peak memory is the whole "
        f"process's peak RSS (libraries included; the model's own memory is in the memory section); tokens/s is the "
        f"median training step **measured on a shared 2-core machine** with other jobs running, so it is a rough "
        f"guide only (the step benchmark is the speed reference)."
    )


def _fmt_duration(seconds: float) -> str:
    """``seconds`` as whole hours from 1.5 h up, else as minutes: "3 hours", "50 minutes"."""
    if seconds >= 5400:
        return f"{seconds / 3600:.0f} hours"
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def _progress(results: list[Result], args, methods, step) -> str:
    """Runs finished and left, the time left at the median pace, and how to resume."""
    left = runs_left_estimate(results, **plan_kw(args, methods))
    pace, tokens_left = seconds_per_token(results), tokens_left_estimate(results, **plan_kw(args, methods))
    eta = (f" At the median pace of the finished runs ({pace * 1e6 / 60:.0f} minutes per 1M tokens, one run at a time "
           f"on the 2-core machine), the {tokens_left / 1e6:.0f}M tokens left take about "
           f"{_fmt_duration(pace * tokens_left)} of its time." if pace and step else "")
    return (
        f"**Progress: {len(results)} run{'s' if len(results) != 1 else ''} finished, "
        + (f"about {left} to go; the study continues.**{eta} Next stage: {step[0]} ({len(step[1])} run(s)). "
           if step else "the study is complete.** ")
        + "Each run's result is in `docs/benchmarks/quality/`; the study resumes from there on any checkout "
        "(`nohup nice -n 19 python -m recipes.bench.quality --jobs 1 --commit-results --data-files "
        "'<corpus>/train/*.txt' --valid-files '<corpus>/valid/*.txt' > /tmp/quality-study.log 2>&1 &`)."
    )


def _budget_table(table: dict, tokens: int) -> list[str]:
    """One budget's comparison: each row's best configuration, its seeds, ratios, parameters, memory, speed."""
    base = table.get("full")
    full_linear = base["runs"][0].record["linear_parameters"] if base and base["runs"][0].finished else None
    lines = [f"### {tokens:,} training tokens", "",
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
    return lines


def _sweep(results: list[Result], methods, short: int) -> list[str]:
    """Every single-rate run of each method at the short budget (diverged ones as inf)."""
    lines = [f"### Learning-rate sweep ({_fmt_tokens(short)} tokens, seed 0; valid ppl, inf = diverged)", "",
             "| method | learning rate: valid ppl |", "|---|---|"]
    for m in methods:
        tried = sorted((r for r in results if (r.run.method, r.run.seed, r.run.tokens) == (m, 0, short) and r.run.one_lr),
                       key=lambda r: r.run.lr)
        if tried:
            lines.append(f"| {m} | " + ", ".join(f"{r.run.lr:g}: {r.ppl:.1f}" for r in tried) + " |")
    lines.append("")
    return lines


def _others_split(results: list[Result], methods, short: int) -> list[str]:
    """Each method but full-rank at its best single rate, and every split point tried (its best in bold)."""
    rows = []
    for m in methods:
        lr = best_lr(results, m, 0, short)
        if m == "full" or lr is None:
            continue
        single = next(r for r in results if r.run == Run(m, lr, 0, short))
        split = sorted((r for r in results if (r.run.method, r.run.seed, r.run.tokens) == (m, 0, short)
                        and r.run.linear_lr_scale != 1), key=lambda r: (r.run.lr * r.run.linear_lr_scale, r.run.lr))
        if not split:
            continue
        best = min([single, *split], key=lambda r: r.ppl)
        cells = [f"{r.run.lr:g} / {r.run.lr * r.run.linear_lr_scale:.4g}: "
                 + (f"**{r.ppl:.1f}**" if r is best else f"{r.ppl:.1f}") for r in split]
        rows.append(f"| {m} | {lr:g}: {single.ppl:.1f} | " + ", ".join(cells) + " |")
    if not rows:
        return []
    return [f"### The other methods' split ({_fmt_tokens(short)} tokens, seed 0; valid ppl)", "",
            "Full-rank's split for every other method: the embeddings, head and norms at 2x and 4x the method's "
            "best single rate, its decoder's linear layers at that rate; then, as for full-rank, the best "
            "point's neighbours a factor of 2 away on each axis (the embeddings' and head's rate up and down, the "
            "decoder's up and down, the decoder's staying below the head's), tried until the best has every "
            f"neighbour tried, up to {MAX_SPLIT_EXTENSIONS} more points.", "",
            "| method | best single rate | split: embeddings and head / decoder: valid ppl |", "|---|---|---|", *rows, ""]


def _rate_recheck(results: list[Result], rows, short: int, longest: int) -> list[str]:
    """Each row's sweep configuration at the longest budget with its rate x0.5, x1 and x2."""
    recheck = []
    for row in rows:
        if row == FULL_ONE_LR or best_run(results, row, short) is None:
            continue
        best = best_run(results, row, short).at(tokens=longest)
        got = {r.run.lr: r.ppl for r in candidates(results, row, longest) if r.run.config()[2:] == best.config()[2:]}
        cells = [f"{got[round_lr(best.lr * f)]:.1f}" if round_lr(best.lr * f) in got else "-" for f in (0.5, 1, 2)]
        if any(c != "-" for c in cells):
            recheck.append(f"| {row} | {best.label()} | " + " | ".join(cells) + " |")
    if not recheck:
        return []
    return [f"### The rate re-checked at {_fmt_tokens(longest)} tokens (seed 0; valid ppl)", "",
            "| method | configuration of the sweep | rate x0.5 | x1 | x2 |", "|---|---|---|---|---|", *recheck, ""]


def _against_full(ratio: float) -> str:
    if round(ratio, 3) == 1:
        return "level with full-rank"
    return f"{abs(ratio - 1):.1%} {'behind' if ratio > 1 else 'ahead of'} full-rank"


def trend_words(first: float, last: float) -> str:
    """How a perplexity ratio to full-rank moved from the shortest budget to the longest, in words.

    >>> trend_words(1.005, 0.993)
    'it gains on full-rank as the budget grows, from 0.5% behind full-rank to 0.7% ahead of full-rank'
    >>> trend_words(0.98, 1.02)
    'it loses ground to full-rank as the budget grows, from 2.0% ahead of full-rank to 2.0% behind full-rank'
    >>> trend_words(1.031, 1.036)
    'it stays within 0.01 of where it started (3.1% behind full-rank to 3.6% behind full-rank)'
    """
    span = f"{_against_full(first)} to {_against_full(last)}"
    if abs(last - first) < 0.01:
        return f"it stays within 0.01 of where it started ({span})"
    way = "gains on full-rank" if last < first else "loses ground to full-rank"
    return f"it {way} as the budget grows, from {span}"


def _trend(series: dict, budgets: list[int]) -> str:
    best = []
    for tokens in budgets:
        here = [(ratio, row) for row, points in series.items() for t, ratio in points if t == tokens and row in STRUCTURED]
        if here:
            best.append((tokens, *min(here)))
    if len(best) < 2:
        return "The trend with budget needs a second budget."
    path = " -> ".join(f"{r:.3f} ({row}, {_fmt_tokens(t)})" for t, r, row in best)
    text = f"Trend: the best of SLTrain / LOST / CoLA against tuned full-rank goes {path}: {trend_words(best[0][1], best[-1][1])}."
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
              ("split (`--linear-lr-scale`)", lambda r: r.linear_lr_scale != 1 and r.warmup is None and not r.init_changed),
              ("warmup", lambda r: r.warmup is not None and not r.init_changed),
              ("init scale", lambda r: r.init_changed)]
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
