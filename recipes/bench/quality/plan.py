"""The quality study's plan: which runs to do next, decided from the results so far, and how much is left.

A run is a :class:`Run` (method, rate, seed, budget and full-rank's extra knobs); its outcome a
:class:`Result`. :func:`stages` yields the study's stages in order, each computed from the results of the
stages before it; :func:`next_stage` is the first one with runs still to do.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from dataclasses import dataclass

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
# The other methods' split, for fairness with full-rank's: the embeddings, head and norms at these multiples of
# the method's best single rate, the decoder's linear layers at that rate (--linear-lr-scale 1/multiple).
OTHERS_SPLIT = [2.0, 4.0]
WARMUPS = [0.03, 0.3]  # around the recipe's 0.1 (a fraction of the steps)
# The std of the decoder's linear weights (--linear-init-std), around transformers' 0.02: the structured methods'
# layers start 0.25-0.4x as large as full-rank's (recipes/bench/quality/init_scale.py), hence two steps down.
LINEAR_INIT_STDS = [0.005, 0.01, 0.04]
FULL_ONE_LR = "full, one lr"  # full-rank at its best single rate, every other setting the recipe's
# Every method's split is then searched around its best point from its first points (full-rank's 2 x 2 grid, the
# others' x2 and x4): the best's neighbours a factor of 2 away on each axis (the embeddings'/head's rate up and
# down, the decoder's up and down, the decoder's staying below the head's) are tried until the best has all of
# them, up to this many more points: the same search for every method, so that no one's best is only the edge
# of where it was looked for.
MAX_SPLIT_EXTENSIONS = 24


def round_lr(x: float) -> float:
    """Rates as 4 significant digits, so that a rate computed twice (x2 then x0.5) names the same run."""
    return float(f"{x:.4g}")


def _six_digits(x: float) -> float:
    """A split's linear rate or scale to 6 digits (4 would turn a scale of 1/64, 0.015625, into another)."""
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class Run:
    """One training run of the study: a method at a rate, seed and budget, and full-rank's extra knobs."""

    method: str
    lr: float
    seed: int
    tokens: int
    linear_lr_scale: float = 1.0
    warmup: float | None = None  # None: the recipe's default for the method
    init_range: float | None = None  # None: the model config's initializer_range (0.02)
    linear_init_std: float | None = None  # None: the decoder's linear weights drawn with initializer_range

    @property
    def name(self) -> str:
        """The run's directory and result-file name; it names every setting that is not the default."""
        extras = "".join(f"-{tag}{value:g}" for tag, value in (("lls", self.linear_lr_scale if self.linear_lr_scale != 1 else None),
                                                             ("wu", self.warmup), ("init", self.init_range),
                                                             ("linit", self.linear_init_std)) if value is not None)
        return f"{self.method}-lr{self.lr:g}{extras}-seed{self.seed}-{self.tokens}tok"

    @property
    def one_lr(self) -> bool:
        """Every setting but the rate is the recipe's."""
        return self.linear_lr_scale == 1 and self.warmup is None and not self.init_changed

    @property
    def init_changed(self) -> bool:
        """The init differs from the config's: another initializer_range, or another std of the linear weights."""
        return self.init_range is not None or self.linear_init_std is not None

    def at(self, **changes) -> Run:
        """This run with some settings changed (a new rate rounded by :func:`round_lr`)."""
        if "lr" in changes:
            changes["lr"] = round_lr(changes["lr"])
        return dataclasses.replace(self, **changes)

    def config(self) -> tuple:
        """What a configuration is, seed and budget aside."""
        return (self.method, self.lr, self.linear_lr_scale, self.warmup, self.init_range, self.linear_init_std)

    def label(self) -> str:
        """The configuration as the report writes it, e.g. "lr 0.0025, linear x0.25"."""
        parts = [f"lr {self.lr:g}"]
        if self.linear_lr_scale != 1:
            parts.append(f"linear x{self.linear_lr_scale:g}")
        if self.warmup is not None:
            parts.append(f"warmup {self.warmup:g}")
        if self.init_range is not None:
            parts.append(f"init {self.init_range:g}")
        if self.linear_init_std is not None:
            parts.append(f"linear init std {self.linear_init_std:g}")
        return ", ".join(parts)


@dataclass
class Result:
    """A run's outcome, as read from its result file."""

    run: Run
    ppl: float  # final validation perplexity; inf when the run diverged
    record: dict  # the result file's contents

    @property
    def finished(self) -> bool:
        return self.record.get("status") == "finished"


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
    """The method a comparison row trains ("full, one lr" is full-rank)."""
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


def split_extensions(tried: dict[tuple[float, float], float]) -> list[tuple[float, float]]:
    """A method's next split points, from those tried as {(head rate, linear rate): ppl}: the best point's
    neighbours a factor of 2 away on each axis that are not tried yet (the linear rate kept below the head's).

    >>> split_extensions({(4e-3, 1e-3): 150.0, (8e-3, 1e-3): 140.0, (8e-3, 5e-4): 145.0})
    [(0.016, 0.001), (0.008, 0.002)]
    """
    if not tried:
        return []
    best = min(tried, key=lambda k: (tried[k], k))
    if not math.isfinite(tried[best]):
        return []
    h, l = best
    out = [(round_lr(2 * h), l)]
    if h / 2 > l:
        out.append((round_lr(h / 2), l))
    if 2 * l < h:
        out.append((h, _six_digits(2 * l)))
    out.append((h, _six_digits(l / 2)))
    return [k for k in out if k not in tried]


def full_tuning_stages(results: list[Result], short: int):
    """Full-rank's split, warmup and init stages at the short budget (each a list of runs), in order; each
    is decided by the results of those before it, so stop at the first one that has runs left to do."""
    mine = [r for r in results if (r.run.method, r.run.seed, r.run.tokens) == ("full", 0, short)]
    lr0 = best_lr(results, "full", 0, short)
    split = [Run("full", lr0, 0, short).at(lr=lr0 * a, linear_lr_scale=s) for a, s in SPLIT_GRID]
    yield "full-rank: learning-rate split", split
    extra = split_neighbours(results, split, short)
    if extra:
        yield "full-rank: split neighbours", extra
    pool = [r for r in mine if r.run.warmup is None and not r.run.init_changed]
    best = min(pool, key=lambda r: (r.ppl, r.run.lr)).run
    yield "full-rank: warmup", [best.at(warmup=w) for w in WARMUPS]
    pool = [r for r in mine if not r.run.init_changed]
    best = min(pool, key=lambda r: (r.ppl, r.run.lr)).run
    yield "full-rank: init scale", [best.at(linear_init_std=s) for s in LINEAR_INIT_STDS]


def _split_key(run: Run) -> tuple[float, float]:
    """(the embeddings'/head's rate, the linear layers' rate) of a split run."""
    return run.lr, _six_digits(run.lr * run.linear_lr_scale)


def split_neighbours(results: list[Result], first: list[Run], short: int) -> list[Run]:
    """The next points of a method's split after its ``first`` points and the extensions run so far
    (:func:`split_extensions`), within ``MAX_SPLIT_EXTENSIONS``; empty once its best has every neighbour tried."""
    method = first[0].method
    tried = {_split_key(r.run): r.ppl for r in results
             if (r.run.method, r.run.seed, r.run.tokens) == (method, 0, short)
             and r.run.linear_lr_scale != 1 and r.run.warmup is None and not r.run.init_changed}
    first_keys = {_split_key(r) for r in first}
    extended = [k for k in tried if k not in first_keys]
    extra = split_extensions(tried)[: max(0, MAX_SPLIT_EXTENSIONS - len(extended))]
    return [first[0].at(lr=h, linear_lr_scale=_six_digits(l / h)) for h, l in extra]


def split_run(method: str, lr: float, factor: float, tokens: int) -> Run:
    """``method`` with its embeddings and head at ``factor`` times ``lr`` and its decoder at ``lr`` (seed 0)."""
    return Run(method, round_lr(lr * factor), 0, tokens, linear_lr_scale=1 / factor)


def others_split_stages(results: list[Result], methods, short: int):
    """The split of every method but full-rank at the short budget: the embeddings and head at 2x and 4x the
    method's best single rate with its decoder at that rate, then around the best as full-rank's."""
    best = {m: best_lr(results, m, 0, short) for m in methods if m != "full"}
    first = {m: [split_run(m, lr, f, short) for f in OTHERS_SPLIT] for m, lr in best.items() if lr is not None}
    yield "the other methods: learning-rate split", [run for runs in first.values() for run in runs]
    extra = [run for runs in first.values() for run in split_neighbours(results, runs, short)]
    if extra:
        yield "the other methods: split neighbours", extra


def rows_of(methods) -> list[str]:
    """The comparison's rows: every method, and "full, one lr" after full-rank."""
    rows = []
    for m in methods:
        rows.append(m)
        if m == "full":
            rows.append(FULL_ONE_LR)
    return rows


def stages(results: list[Result], methods, budgets, *, seeds: int = 2, max_extensions: int = 2,
           grids: dict | None = None, tune_full: bool = True, look_ahead: bool = False):
    """The study's stages as (name, runs), in the order they run; each is computed from the results of the
    stages before it, so this yields up to the first stage that has runs without a result and stops.
    ``look_ahead`` goes on past such stages (after the sweep), each computed from the results as they stand:
    what is left, were no best to move."""
    grids = grids or GRIDS
    have = {r.run for r in results}
    budgets = sorted(budgets)
    short, longest = budgets[0], budgets[-1]

    def pending(stage):
        return not look_ahead and any(run not in have for run in stage)

    # 1. the sweep: every method's middle rate first, then the lower ones, then the higher ones
    width = max(len(grids[m]) for m in methods)
    order = sorted(range(width), key=lambda i: (abs(i - (width - 1) / 2), i))
    sweep = [Run(m, grids[m][i], 0, short) for i in order for m in methods if i < len(grids[m])]
    yield "sweep", sweep
    if any(run not in have for run in sweep):  # nothing after it can be computed before it ends
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
        if not look_ahead:
            return
    # 3. full-rank's tuning, then the same split for the others (the longer budgets take each one's best)
    if tune_full and "full" in methods:
        for name, stage in itertools.chain(full_tuning_stages(results, short), others_split_stages(results, methods, short)):
            yield name, stage
            if pending(stage):
                return
    rows = rows_of(methods)
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
    # (looking ahead, a row without a result at the longest budget yet stands in with its best at the shortest)
    bests = [best_run(results, row, longest) or best_run(results, row, short).at(tokens=longest)
             for row in rows if row != FULL_ONE_LR]
    stage = _unique([best.at(seed=s) for s in range(1, seeds) for best in bests])
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


def plan_kw(args, methods) -> dict:
    """The keyword arguments of :func:`stages` from the command line's."""
    return {"methods": methods, "budgets": args.budgets, "seeds": args.seeds, "max_extensions": args.max_extensions,
            "grids": args.grids, "tune_full": args.tune_full}


# ---- what is left ----------------------------------------------------------------------------------
def _left(results: list[Result], methods, budgets, seeds: int, weight, **kw) -> int:
    """The work still to do, a run counting ``weight(its tokens)``: the runs without a result in every stage
    as the results stand (:func:`stages` looking ahead), and before the sweep has ended the stages after it
    at their fixed sizes (the grid's edges and every method's split neighbours, decided as results come in,
    are counted once they are known)."""
    have = {r.run for r in results}
    counted, seen = set(), []
    for name, stage in stages(results, methods, budgets, seeds=seeds, look_ahead=True, **kw):
        seen.append(name)
        counted |= {r for r in stage if r not in have}
    left = sum(weight(r.tokens) for r in counted)
    budgets = sorted(budgets)
    short, longest = budgets[0], budgets[-1]
    future = []  # (stage, runs, tokens of each)
    if "full" in methods and kw.get("tune_full", True):
        future += [("full-rank: learning-rate split", len(SPLIT_GRID), short), ("full-rank: warmup", len(WARMUPS), short),
                   ("full-rank: init scale", len(LINEAR_INIT_STDS), short),
                   ("the other methods: learning-rate split", len(OTHERS_SPLIT) * (len(methods) - 1), short)]
    future += [(f"{t:,} tokens", len(rows_of(methods)), t) for t in budgets[1:]]
    future += [(f"{longest:,} tokens: rate x0.5 and x2", 2 * len(methods), longest),
               (f"{longest:,} tokens: seeds 1..{seeds - 1}", (seeds - 1) * len(methods), longest)]
    return left + sum(n * weight(t) for name, n, t in future if name not in seen)


def runs_left_estimate(results: list[Result], methods, budgets, seeds: int, **kw) -> int:
    """Runs still to do, as :func:`_left` counts them."""
    return _left(results, methods, budgets, seeds, lambda tokens: 1, **kw)


def tokens_left_estimate(results: list[Result], methods, budgets, seeds: int, **kw) -> int:
    """Training tokens still to do, counted as :func:`runs_left_estimate` counts runs."""
    return _left(results, methods, budgets, seeds, lambda tokens: tokens, **kw)


def seconds_per_token(results: list[Result]) -> float | None:
    """The median over finished runs of wall time per training token (training time where the wall time was
    not recorded), evaluations and checkpoints included where it was. The median, not the total: a run
    paused while the machine did other work (its wall time then counts the pause) does not set the pace.

    >>> from types import SimpleNamespace as R
    >>> runs = [R(finished=True, record={"wall_seconds": w, "tokens": 1000}) for w in (3, 5, 900)]
    >>> seconds_per_token(runs)
    0.005
    """
    done = [r.record for r in results if r.finished]
    if not done:
        return None
    return statistics.median((r.get("wall_seconds") or r["train_seconds"]) / r["tokens"] for r in done)
