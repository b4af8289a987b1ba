"""recipes/bench/quality/: its plan, its result files, its report and its ratio plot.

The unit tests build result files from fake run directories (a ``summary.json`` and ``metrics.jsonl`` as
``recipes/pretrain.py`` writes them) and never train; the ``--quick`` study end to end trains real tiny
models (the first in a subprocess, as the study runs each) and is marked slow.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from recipes.bench.quality.cli import build_parser, main
from recipes.bench.quality.execute import execute, finish, setup_of
from recipes.bench.quality.plan import (
    FULL_ONE_LR,
    GRIDS,
    MAX_SPLIT_EXTENSIONS,
    Result,
    Run,
    best_run,
    edge_extension,
    next_stage,
    round_lr,
    rows_of,
    runs_left_estimate,
    split_extensions,
    tokens_left_estimate,
)
from recipes.bench.quality.plots import plot_ratios
from recipes.bench.quality.report import ratio_series, verdict
from recipes.bench.quality.results import commit, read_result, read_results

ROOT = Path(__file__).resolve().parent.parent
SETUP = {"model": "llama_20m", "batch_size": 4, "seq_len": 256, "valid_tokens": 65536, "passage_chars": 4000,
         "data_files": "corpus/train/*.txt", "valid_files": "corpus/valid/*.txt"}
LINEAR = {"full": 3_162_112, "lowrank": 1_249_280, "sltrain": 1_344_000, "lost": 1_400_000, "lost-silu": 1_400_000,
          "cola": 1_249_280}


def fake_run_dir(out: Path, run: Run, ppl: float | None, *, speed: float = 1000.0, memory: float = 900.0) -> Path:
    """A run directory as pretrain.py leaves it: finished (``summary.json``) or diverged (``failed.txt``)."""
    run_dir = out / run.name
    run_dir.mkdir(parents=True)
    per_step, steps = 1024, 8
    lines = [{"type": "eval", "step": 0, "tokens": 0, "val_loss": 9.0, "val_ppl": math.exp(9.0)}]
    lines += [{"type": "train", "step": s, "tokens": s * per_step, "loss": 9.0 - s / 4, "time": s * per_step / speed}
              for s in range(1, steps + 1)]
    if ppl is None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (run_dir / "failed.txt").write_text("diverged: the loss or the gradient became non-finite\n")
        return run_dir
    lines.append({"type": "eval", "step": steps, "tokens": steps * per_step, "val_loss": math.log(ppl),
                  "val_ppl": ppl})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    linear = LINEAR[run.method]
    params = {"total": linear + 4_196_608, "embedding": 2_097_152, "lm_head": 2_097_152, "norm": 2304,
              "dense_linear": linear if run.method == "full" else 0, "lowrank_factors": 0 if run.method == "full" else linear,
              "sparse": 0, "other_factors": 0}
    summary = {"model": "llama_20m", "method": run.method, "steps": steps, "tokens": steps * per_step,
               "initial_val_ppl": math.exp(9.0), "final_val_loss": math.log(ppl), "final_val_ppl": ppl,
               "parameters": params, "peak_memory_mib": memory, "memory_kind": "cpu peak RSS (whole process)",
               "tokens_per_s": speed * 0.9, "train_seconds": steps * per_step / speed}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def study_args(tmp_path: Path, **changes) -> Namespace:
    args = build_parser().parse_args(["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    args.grids, args.commit_results = dict(GRIDS), False
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def finished(tmp_path: Path, args: Namespace, run: Run, ppl: float | None, **kw) -> Result:
    """The result file of a fake run, written by the study's own finish step."""
    fake_run_dir(Path(args.out), run, ppl, **kw)
    return finish(run, args)


# ---- the plan --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ppl_by_lr, expected", [
    ({1e-3: 30.0, 2e-3: 25.0, 4e-3: 27.0}, None),            # best inside the grid: done
    ({1e-3: 30.0, 2e-3: 25.0, 4e-3: 24.0}, 8e-3),            # best at the top: go higher
    ({1e-3: 24.0, 2e-3: 25.0, 4e-3: math.inf}, 5e-4),        # best at the bottom: go lower
    ({1e-3: 30.0, 2e-3: math.inf}, 5e-4),                    # the top diverged: below is the only way
    ({1e-3: 25.0}, None),                                    # one rate says nothing about edges
])
def test_edge_extension_moves_toward_the_better_side(ppl_by_lr, expected):
    result = edge_extension(ppl_by_lr)
    assert result == (None if expected is None else pytest.approx(expected))


def test_run_names_are_stable_and_name_every_setting():
    run = Run("full", 1e-3, 0, 1_000_000)
    assert run.name == "full-lr0.001-seed0-1000000tok"  # the earlier study's names, unchanged
    tuned = run.at(lr=2.5e-3, linear_lr_scale=0.25, warmup=0.03, init_range=0.04)
    assert tuned.name == "full-lr0.0025-lls0.25-wu0.03-init0.04-seed0-1000000tok"
    assert run.at(linear_init_std=0.005).name == "full-lr0.001-linit0.005-seed0-1000000tok"
    assert run.at(linear_init_std=0.005).label() == "lr 0.001, linear init std 0.005"
    assert run.at(lr=run.lr * 3 * 0.5 / 1.5) == run  # a rate computed twice names the same run
    assert run.one_lr and not tuned.one_lr and not run.at(linear_init_std=0.01).one_lr


def synthetic_ppl(run: Run) -> float:
    """A bowl in log-rate around a per-method optimum; full-rank gains from the split, shrinking with tokens."""
    best = {"full": 1e-3, "lowrank": 7.5e-4, "sltrain": 1.5e-3, "lost": 7.5e-4, "lost-silu": 3e-3, "cola": 12e-3}
    level = {"full": 255, "lowrank": 238, "sltrain": 158, "lost": 177, "lost-silu": 145, "cola": 150}
    ppl = level[run.method] * (1e6 / run.tokens) ** 0.4 * (1 + 0.1 * math.log2(run.lr * run.linear_lr_scale / best[run.method]) ** 2)
    if run.method == "full" and run.linear_lr_scale != 1:
        ppl *= 0.85 + 0.1 * abs(math.log2(run.lr / 2.5e-3))
    if run.method == "sltrain" and run.linear_lr_scale != 1:  # the others gain nothing from theirs
        ppl *= 1 - 0.01 * math.log2(1 / run.linear_lr_scale)
    if run.warmup == 0.03:
        ppl *= 0.98
    if run.linear_init_std is not None:
        ppl *= 1.05 if run.linear_init_std == 0.04 else 1.03
    return ppl * (1 + 0.01 * run.seed)


def simulate(methods, budgets, seeds=2):
    """Run the planner to the end, 'training' each run with synthetic_ppl; returns (stages, results)."""
    results, seen = [], []
    kw = {"methods": methods, "budgets": budgets, "seeds": seeds, "max_extensions": 2, "grids": GRIDS, "tune_full": True}
    while (step := next_stage(results, **kw)) is not None:
        name, runs = step
        assert runs and not any(r in {x.run for x in results} for r in runs), name  # only new runs
        seen.append((name, runs))
        results += [Result(r, synthetic_ppl(r), {"status": "finished"}) for r in runs]
        assert len(seen) < 40
    return seen, results


def test_the_plan_sweeps_tunes_full_rank_then_grows_the_budget():
    methods = ["full", "lowrank", "sltrain", "lost", "lost-silu", "cola"]
    stages, results = simulate(methods, [1_000_000, 2_000_000, 4_000_000, 8_000_000])
    names = [n for n, _ in stages]
    # the sweep first, every method's middle rate before any other rate
    assert names[0] == "sweep"
    assert [r.lr for r in stages[0][1][:6]] == [GRIDS[m][1] for m in methods]
    # then the grid's edges (LOST-SiLU's best 3e-3 and CoLA's 1.2e-2 lie above their grids), full-rank's
    # tuning, and the budgets in increasing order, the longest's rate check and seeds last
    order = ["grid edges", "full-rank: learning-rate split", "full-rank: split neighbours", "full-rank: warmup",
             "full-rank: init scale", "the other methods: learning-rate split", "the other methods: split neighbours", "2,000,000 tokens", "4,000,000 tokens", "8,000,000 tokens", "8,000,000 tokens: rate x0.5 and x2",
             "8,000,000 tokens: seeds 1..1"]
    assert list(dict.fromkeys(n for n in names if n in order)) == order  # a stage may repeat (edges), never go back
    assert names.index("full-rank: learning-rate split") > max(i for i, n in enumerate(names) if n == "grid edges")
    assert all(r.tokens == 1_000_000 for n, s in stages[:names.index("2,000,000 tokens")] for r in s)
    edges = [r for n, s in stages if n == "grid edges" for r in s]
    assert {(r.method, r.lr) for r in edges} == {("lost-silu", 6e-3), ("cola", 1.2e-2), ("cola", 2.4e-2)}
    # full-rank's tuning follows its best: the split around lr 1e-3, then warmup 0.03 kept, no other init
    split = dict(stages)["full-rank: learning-rate split"]
    assert {(r.lr, r.linear_lr_scale) for r in split} == {(2.5e-3, 0.25), (2.5e-3, 0.125), (5e-3, 0.125), (5e-3, 0.25)}
    best_full = best_run(results, "full", 1_000_000)
    assert best_full.linear_lr_scale != 1 and best_full.warmup == 0.03 and not best_full.init_changed
    inits = dict(stages)["full-rank: init scale"]
    assert [r.linear_init_std for r in inits] == [0.005, 0.01, 0.04] and all(r.warmup == 0.03 for r in inits)
    # the others' split: the embeddings and head at 2x and 4x each one's best rate, the decoder at it
    others = dict(stages)["the other methods: learning-rate split"]
    assert {(r.method, r.lr, r.linear_lr_scale) for r in others if r.method == "lost"} == {("lost", 1.5e-3, 0.5), ("lost", 3e-3, 0.25)}
    assert len(others) == 2 * 5 and all(r.tokens == 1_000_000 for r in others)
    # then the best point's untried neighbours: SLTrain gains from every doubling of its embeddings' rate in
    # this synthetic study, so its head rate doubles, its decoder's tried at x2 and x0.5 beside each new best,
    # until the allowance is spent; the others gain nothing from the split (x2 and x4 tie, the lower counts as
    # best), whose one untried neighbour is the decoder at half rate
    edges = [r for n, s in stages if n == "the other methods: split neighbours" for r in s]
    mine = [r for r in edges if r.method == "sltrain"]
    assert len(mine) == MAX_SPLIT_EXTENSIONS
    # (the scale is kept to 6 digits, as run names write it: far out, the decoder's rate drifts by 1e-6)
    heads = sorted(r.lr for r in mine if math.isclose(r.lr * r.linear_lr_scale, 1.5e-3, rel_tol=1e-5))
    assert heads == [round_lr(1.2e-2 * 2**k) for k in range(len(heads))] and len(heads) >= 4
    assert {(r.lr, r.lr * r.linear_lr_scale) for r in mine if r.lr == 2.4e-2} == {(2.4e-2, 1.5e-3), (2.4e-2, 3e-3), (2.4e-2, 7.5e-4)}
    assert {(r.method, r.lr, r.linear_lr_scale) for r in edges if r.method != "sltrain"} == {
        ("lowrank", 1.5e-3, 0.25), ("lost", 1.5e-3, 0.25), ("lost-silu", 6e-3, 0.25), ("cola", 2.4e-2, 0.25)}
    # every longer budget runs each row at its best configuration of the sweep, "full, one lr" included
    at_2m = dict(stages)["2,000,000 tokens"]
    assert [(r.lr, r.linear_lr_scale) for r in at_2m if r.method == "sltrain"] == [(heads[-1], float(f"{1.5e-3 / heads[-1]:.6g}"))]
    assert best_full.at(tokens=2_000_000) in at_2m and Run("full", 1e-3, 0, 2_000_000) in at_2m
    assert Run("lost-silu", 3e-3, 0, 2_000_000) in at_2m and len(at_2m) == 7
    # the longest budget: x0.5 and x2 of each method (not of "full, one lr"), then seed 1 of the best of three
    recheck = dict(stages)["8,000,000 tokens: rate x0.5 and x2"]
    assert len(recheck) == 12 and best_full.at(tokens=8_000_000, lr=best_full.lr * 2) in recheck
    seeds = dict(stages)["8,000,000 tokens: seeds 1..1"]
    assert {r.method for r in seeds} == set(methods) and all(r.seed == 1 for r in seeds)
    assert Run("cola", 1.2e-2, 1, 8_000_000) in seeds


def test_the_default_plan_ends_at_4m_tokens():
    """1M, 2M and 4M: 8M does not fit the shared machine's time (the goal asks for at least 4M)."""
    budgets = build_parser().parse_args([]).budgets
    assert budgets == [1_000_000, 2_000_000, 4_000_000]
    stages, _ = simulate(["full", "lost"], budgets)
    assert [n for n, _ in stages][-2:] == ["4,000,000 tokens: rate x0.5 and x2", "4,000,000 tokens: seeds 1..1"]


def test_the_plan_stops_at_the_first_unfinished_stage_and_the_estimate_counts_down():
    methods, budgets = ["full", "lost"], [1000, 4000]
    kw = {"methods": methods, "budgets": budgets, "seeds": 2, "max_extensions": 2, "grids": GRIDS, "tune_full": True}
    first = next_stage([], **kw)
    assert first[0] == "sweep" and len(first[1]) == 6
    half = [Result(r, synthetic_ppl(r), {}) for r in first[1][:3]]
    assert next_stage(half, **kw) == ("sweep", first[1][3:])  # no later stage before the sweep ends
    _, results = simulate(methods, budgets)
    estimate = runs_left_estimate([], **kw)
    assert abs(estimate - len(results)) <= 4  # the grid's and the split's edges are not known in advance
    assert runs_left_estimate(results, **kw) == 0
    tokens = sum(r.run.tokens for r in results)
    assert tokens - 4 * 1000 <= tokens_left_estimate([], **kw) <= tokens  # the unknown edges run at 1000
    assert tokens_left_estimate(results, **kw) == 0


def test_the_estimate_looks_ahead_past_the_pending_stage():
    """A run of an early stage missing (say the search found one more point to try) while the later budgets
    have results: the estimate counts what is really left, not the later stages' full sizes."""
    methods, budgets = ["full", "lost", "cola"], [1000, 2000, 4000]
    kw = {"methods": methods, "budgets": budgets, "seeds": 2, "max_extensions": 2, "grids": GRIDS, "tune_full": True}
    stages, results = simulate(methods, budgets)
    inits = dict(stages)["full-rank: init scale"]
    worst = max((r for r in results if r.run in inits), key=lambda r: r.ppl)  # not a best: removing it moves none
    partial = [r for r in results if r is not worst][:-1]  # and the last seed's run not done yet
    assert next_stage(partial, **kw) == ("full-rank: init scale", [worst.run])
    assert runs_left_estimate(partial, **kw) == 2


def test_split_extensions_try_the_best_points_untried_neighbours():
    tried = {(2.5e-3, 6.25e-4): 300.0, (2.5e-3, 3.125e-4): 310.0, (5e-3, 6.25e-4): 305.0, (5e-3, 1.25e-3): 320.0}
    # head x0.5 and the decoder x2 are new; head x2 and the decoder x0.5 were tried
    assert split_extensions(tried) == [(1.25e-3, 6.25e-4), (2.5e-3, 1.25e-3)]
    tried |= {(1.25e-3, 6.25e-4): 301.0, (2.5e-3, 1.25e-3): 302.0}
    assert split_extensions(tried) == []  # a best with every neighbour tried: the search ends
    tried[(5e-3, 3.125e-4)] = 290.0  # a new best inside the rates tried still has untried neighbours
    assert split_extensions(tried) == [(1e-2, 3.125e-4), (5e-3, 1.5625e-4)]
    # the decoder's rate stays below the head's: from (2e-3, 1e-3) neither head x0.5 nor decoder x2 is a split
    assert split_extensions({(2e-3, 1e-3): 100.0}) == [(4e-3, 1e-3), (2e-3, 5e-4)]
    assert split_extensions({(1e-3, 1e-4): math.inf}) == []


# ---- result files ----------------------------------------------------------------------------------
def test_result_file_round_trip(tmp_path):
    args = study_args(tmp_path)
    run = Run("full", 2.5e-3, 0, 8192, linear_lr_scale=0.25, warmup=0.03)
    finished(tmp_path, args, run, 123.4, speed=2000.0, memory=987.0)
    path = tmp_path / "results" / f"{run.name}.json"
    record = json.loads(path.read_text())
    assert record["run"] == {"method": "full", "lr": 2.5e-3, "seed": 0, "tokens": 8192, "linear_lr_scale": 0.25,
                             "warmup": 0.03, "init_range": None, "linear_init_std": None}
    assert record["status"] == "finished" and record["final_val_ppl"] == pytest.approx(123.4)
    assert record["initial_val_loss"] == 9.0 and record["initial_val_ppl"] == pytest.approx(math.exp(9.0))
    assert record["eval"] == [[0, 0, 9.0], [8, 8192, pytest.approx(math.log(123.4))]]
    assert record["linear_parameters"] == LINEAR["full"] and record["peak_memory_mib"] == 987.0
    assert record["tokens_per_s"] == pytest.approx(2000.0)  # the median step, not the summary's mean
    assert record["setup"]["model"] == "llama_20m" and record["setup"]["seq_len"] == 256
    again = read_result(path)
    assert again.run == run and again.ppl == pytest.approx(123.4) and again.finished
    assert "[0, 0, 9.0]" in path.read_text()  # curves stay on one line each
    diverged = finished(tmp_path, args, run.at(lr=1e-2), None)
    assert diverged.ppl == math.inf and not diverged.finished
    assert read_result(tmp_path / "results" / f"{diverged.run.name}.json").ppl == math.inf


def test_a_result_file_under_another_setup_is_refused(tmp_path):
    args = study_args(tmp_path)
    finished(tmp_path, args, Run("lost", 1e-3, 0, 8192), 100.0)
    assert len(read_results(args.results, setup_of(args))) == 1
    with pytest.raises(SystemExit, match="not this study's"):
        read_results(args.results, {**setup_of(args), "seq_len": 512})


def test_a_run_with_a_result_file_is_never_run_again(tmp_path, monkeypatch):
    args = study_args(tmp_path)
    run = Run("sltrain", 1.5e-3, 0, 8192)
    finished(tmp_path, args, run, 150.0)
    import shutil

    shutil.rmtree(Path(args.out))  # a fresh clone: the result file only

    def no_training(*a, **k):
        raise AssertionError("a run with a result file was started again")

    monkeypatch.setattr(subprocess, "run", no_training)
    result = execute(run, args)
    assert result.ppl == pytest.approx(150.0) and not Path(args.out).exists()


def test_a_run_that_ended_without_its_result_file_gets_one_without_training(tmp_path, monkeypatch):
    args = study_args(tmp_path)
    run = Run("cola", 3e-3, 0, 8192)
    fake_run_dir(Path(args.out), run, 140.0)  # summary.json written, then the study was stopped
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("retrained"))
    assert execute(run, args).ppl == pytest.approx(140.0)
    assert (Path(args.results) / f"{run.name}.json").exists()


def test_a_run_is_trained_with_its_settings_and_a_divergence_is_a_result(tmp_path, monkeypatch):
    args = study_args(tmp_path, train_passages="p/train/*.jsonl", valid_passages="p/valid/*.jsonl")
    run = Run("full", 2e-3, 1, 8192, linear_lr_scale=0.25, warmup=0.3, init_range=0.04, linear_init_std=0.01)
    calls = []

    def fake_pretrain(command, stdout, **kw):
        calls.append(command)
        stdout.write("pretrain.py: error: stopped at step 3: the loss is nan; nothing was saved for this step.\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", fake_pretrain)
    result = execute(run, args)
    assert len(calls) == 1 and not result.finished and result.ppl == math.inf
    flags = dict(zip(calls[0][2::2], calls[0][3::2]))
    assert (flags["--lr"], flags["--linear-lr-scale"], flags["--warmup"], flags["--seed"]) == ("0.002", "0.25", "0.3", "1")
    assert flags["--linear-init-std"] == "0.01"
    config = json.loads(Path(flags["--model"]).read_text())
    assert config["initializer_range"] == 0.04 and config["hidden_size"] == 256  # llama_20m's shape, another init


def test_a_crash_is_retried_once_then_raised(tmp_path, monkeypatch):
    args = study_args(tmp_path, train_passages="t", valid_passages="v")
    calls = []

    def crash(command, stdout, **kw):
        calls.append(command)
        stdout.write("Killed\n")
        return subprocess.CompletedProcess(command, -9)

    monkeypatch.setattr(subprocess, "run", crash)
    with pytest.raises(RuntimeError, match="failed"):
        execute(Run("lost", 1e-3, 0, 8192), args)
    assert len(calls) == 2 and "--resume" in calls[1]


def test_commit_records_that_file_only_and_waits_for_the_index_lock(tmp_path):
    import threading

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "a").write_text("a")
    git("add", "a")
    git("commit", "-qm", "init")
    (tmp_path / "other").write_text("someone else's staged work")
    git("add", "other")
    result = tmp_path / "results" / "x.json"
    result.parent.mkdir()
    result.write_text("{}\n")
    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(1.0, lock.unlink).start()
    assert commit(result, "quality study: x finished (ppl 1.0)", repo=tmp_path)
    assert git("show", "--name-only", "--format=%s", "HEAD").splitlines() == [
        "quality study: x finished (ppl 1.0)", "", "results/x.json"]
    assert git("status", "--short").strip() == "A  other"  # still staged, not committed with it
    assert not commit(result, "again", repo=tmp_path)  # unchanged: nothing to commit


# ---- the report ------------------------------------------------------------------------------------
def write_study(tmp_path: Path, with_full: bool = True) -> Namespace:
    """Fake result files of a small study (two budgets): the report must come from these alone."""
    args = study_args(tmp_path, budgets=[8192, 16384], methods=None)
    table = {  # (run, ppl)
        Run("full", 1e-3, 0, 8192): 200.0, Run("full", 5e-4, 0, 8192): 230.0, Run("full", 2e-3, 0, 8192): 220.0,
        Run("full", 2.5e-3, 0, 8192, linear_lr_scale=0.25): 180.0, Run("full", 1e-3, 0, 8192, linear_init_std=0.005): 190.0,
        Run("lowrank", 7.5e-4, 0, 8192): 190.0, Run("sltrain", 1.5e-3, 0, 8192): 150.0,
        Run("lost", 7.5e-4, 0, 8192): 160.0, Run("cola", 3e-3, 0, 8192): 140.0, Run("cola", 6e-3, 0, 8192): None,
        Run("full", 2.5e-3, 0, 16384, linear_lr_scale=0.25): 100.0, Run("full", 2.5e-3, 1, 16384, linear_lr_scale=0.25): 104.0,
        Run("full", 1e-3, 0, 16384): 110.0,
        Run("lowrank", 7.5e-4, 0, 16384): 112.0, Run("sltrain", 1.5e-3, 0, 16384): 103.0,
        Run("lost", 7.5e-4, 0, 16384): 105.0, Run("cola", 3e-3, 0, 16384): 101.0, Run("cola", 3e-3, 1, 16384): 103.0,
        Run("cola", 6e-3, 0, 16384): 104.0,
    }
    for run, ppl in table.items():
        if with_full or run.method != "full":
            finished(tmp_path, args, run, ppl)
    import shutil

    shutil.rmtree(Path(args.out))
    return args


def test_ratio_series_divides_by_tuned_full_rank_at_each_budget(tmp_path):
    args = write_study(tmp_path)
    results = read_results(args.results)
    rows = rows_of(["full", "lowrank", "sltrain", "lost", "cola"])
    series = ratio_series(results, rows)
    assert series["cola"] == [(8192, pytest.approx(140 / 180)), (16384, pytest.approx(102 / 102))]  # 2 seeds' mean
    assert series["lowrank"] == [(8192, pytest.approx(190 / 180)), (16384, pytest.approx(112 / 102))]
    assert series[FULL_ONE_LR] == [(8192, pytest.approx(200 / 180)), (16384, pytest.approx(110 / 102))]
    assert "full" not in series
    png = plot_ratios(series, tmp_path / "ratio.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without_full = write_study(tmp_path / "b", with_full=False)
    assert ratio_series(read_results(without_full.results), rows) == {}


def test_the_report_comes_from_the_result_files_alone(tmp_path, capsys):
    args = write_study(tmp_path)
    assert not Path(args.out).exists()
    results = main(["--report-only", "--no-write", "--results", args.results, "--out", str(tmp_path / "none"),
                            "--budgets", "8192", "16384", "--methods", "full", "lowrank", "sltrain", "lost", "cola"])
    assert len(results) == 19
    text = capsys.readouterr().out
    # each budget's table: the best seed-0 configuration, its seeds' mean, ratios and parameter shares
    assert "| full | lr 0.0025, linear x0.25 | 102.0 (100.0, 104.0) | 1.000 | 3.16M | 1.00 |" in text
    assert "| cola | lr 0.003 | 102.0 (101.0, 103.0) | 1.000 | 1.25M | 0.40 |" in text
    assert f"| {FULL_ONE_LR} | lr 0.001 | 110.0 (110.0) | 1.078 |" in text
    assert "| cola | 0.003: 140.0, 0.006: inf |" in text  # the diverged rate is in the sweep
    # the targets at the longest budget, stated as met or not
    assert "### Targets at 16,384 tokens" in text
    assert "**met** -- cola at 102.0 against 102.0, 1.000x, with 0.40x the linear parameters." in text
    assert "Low-rank visibly worse (at least 5% above that best): **met** -- 112.0, 1.098x cola" in text
    assert "| lost | 0.889 | 1.029 |" in text
    assert ("Trend: the best of SLTrain / LOST / CoLA against tuned full-rank goes 0.778 (cola, 8,192) -> 1.000 "
            "(cola, 16,384): it loses ground to full-rank as the budget grows, from 22.2% ahead of full-rank to level "
            "with full-rank." in text)
    assert "split (`--linear-lr-scale`): 180.0 (-10.0%" in text
    assert "| cola | lr 0.003 | - | 101.0 | 104.0 |" in text  # the rate re-check at the longest budget
    # why: the rows in order of their layers' scale at init, and Spearman's rho = 1 - 6 sum(d^2) / (n (n^2 - 1))
    why = text[text.index("### Why"):text.index("### Full-rank tuning")]
    order = [line.split(" | ")[0].lstrip("| ") for line in why.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert order == ["full, linear init std 0.005", "sltrain", "lost", "lowrank", "full", "cola"]  # by init gain: 0.005 x sqrt(d), 3% of entries, W0 truncated, r of d, std 0.02, CoLA
    gain_ranks, ppl_ranks = [0, 1, 2, 3, 4], [1, 2, 4, 3, 0]  # ppl 150, 160, 190, 180, 140
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(gain_ranks, ppl_ranks)) / (5 * (5**2 - 1))
    assert f"(GaLore aside): {rho:+.2f} (5 methods;" in why
    # and the direct test: full-rank from a smaller init against the same configuration from its own
    assert "lr 0.001, linear init std 0.005 (init gain 0.087): 190.0 against 200.0 (-5.0%)" in why
    assert "the best is -5.0%: the init scale moves full-rank" in why


def test_the_report_writes_its_figures_and_section(tmp_path, monkeypatch):
    args = write_study(tmp_path)
    written = {}
    monkeypatch.setattr("recipes.bench.report.write_section", lambda name, title, body: written.update(body=body) or Path("x"))
    main(["--report-only", "--results", args.results, "--figures", str(tmp_path / "fig"), "--budgets", "8192",
                  "16384", "--methods", "full", "lowrank", "sltrain", "lost", "cola"])
    assert (tmp_path / "fig" / "quality_ratio.png").exists() and (tmp_path / "fig" / "quality_16384tok.png").exists()
    assert "quality_ratio.png)" in written["body"]


def test_verdict_says_not_met_when_full_rank_is_ahead():
    def row(ppl, linear):
        return {"ppl": ppl, "runs": [Result(Run("x", 1e-3, 0, 1), ppl, {"status": "finished", "linear_parameters": linear})]}

    table = {"full": row(100.0, 1000), "lost": row(103.0, 440), "lowrank": row(104.0, 400)}
    text = "\n".join(verdict(table, 1))
    assert "**not met** -- lost at 103.0 against 100.0, 1.030x" in text
    assert "Low-rank visibly worse (at least 5% above that best): **not met**" in text
    table["lost"] = row(101.0, 460)  # close enough, but more than 45% of the linear parameters
    assert "**not met**" in verdict(table, 1)[0]


def test_report_only_without_results_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        main(["--report-only", "--no-write", "--results", str(tmp_path)])


def test_the_corpus_is_required_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--no-write", "--data-files", "x.txt", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--valid-files required: the corpus to train and validate on" in capsys.readouterr().err


def _first_in_a_subprocess_then_in_process(monkeypatch):
    """Make the study's ``subprocess.run`` of ``recipes/pretrain.py`` run the first command as the study does
    (a fresh process) and the others in this process: the same ``main`` on the same arguments, without
    paying the imports again for each tiny run."""
    import contextlib

    import torch

    from recipes import pretrain

    real_run, calls = subprocess.run, []
    monkeypatch.chdir(ROOT)  # the study runs each command from the repository root
    threads = torch.get_num_threads()

    def run(command, *, stdout, stderr, cwd, env, check):
        calls.append(command)
        assert command[1] == "recipes/pretrain.py" and Path(cwd) == ROOT
        if len(calls) == 1:
            return real_run(command, stdout=stdout, stderr=stderr, cwd=cwd, env=env, check=check)
        code = 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            try:
                pretrain.main(command[2:])
            except SystemExit as exit_info:
                code = exit_info.code if isinstance(exit_info.code, int) else 1
            finally:
                torch.set_num_threads(threads)  # main sets the run's --threads
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr("recipes.bench.quality.execute.subprocess.run", run)
    return calls


@pytest.mark.slow
def test_quick_study_end_to_end_and_report_from_result_files(tmp_path, capsys, monkeypatch):
    """Real tiny runs (the first in a subprocess, as the study runs each, the others in this process to
    save their start-up): the plan runs to its end, and the report reads the same with runs/ deleted."""
    calls = _first_in_a_subprocess_then_in_process(monkeypatch)
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "red", "blue", "and", "then", "it", "was",
             "big", "small"]
    for name, count in (("train.txt", 4000), ("valid.txt", 800)):
        (tmp_path / name).write_text(" ".join(rng.choice(words) for _ in range(count)))
    out = tmp_path / "runs"
    argv = ["--quick", "--no-write", "--data-files", str(tmp_path / "train.txt"), "--valid-files",
            str(tmp_path / "valid.txt"), "--out", str(out)]
    results = main(argv)
    first = capsys.readouterr().out
    assert len(calls) == len(results) > 1
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in out.iterdir() if (d / "summary.json").exists()}
    assert sorted(summaries) == sorted(r.run.name for r in results)
    for r in results:
        assert r.ppl == pytest.approx(summaries[r.run.name]["final_val_ppl"])
    import shutil

    for d in out.iterdir():
        if d.name != "results":
            shutil.rmtree(d)
    again = main(argv + ["--report-only"])
    assert sorted(r.run.name for r in again) == sorted(r.run.name for r in results)
    assert capsys.readouterr().out.split("### 2,048")[1] == first.split("### 2,048")[1]


def test_runs_as_a_module_from_the_repository_root(tmp_path):
    """``python -m recipes.bench.quality`` (its imports are the package's)."""
    result = subprocess.run([sys.executable, "-m", "recipes.bench.quality", "--report-only",
                             "--no-write", "--results", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, check=False)
    assert result.returncode == 1 and "no finished runs" in result.stderr, result.stderr[-2000:]


def test_the_report_shows_the_other_methods_split_beside_their_best_single_rate():
    from recipes.bench.quality.report import _others_split

    results = [Result(Run("lost", lr, 0, 1000), ppl, {"status": "finished"}) for lr, ppl in ((1e-3, 200.0), (2e-3, 210.0))]
    results += [Result(Run("lost", 2e-3, 0, 1000, linear_lr_scale=0.5), 190.0, {"status": "finished"}),
                Result(Run("lost", 4e-3, 0, 1000, linear_lr_scale=0.25), 185.0, {"status": "finished"}),
                Result(Run("full", 1e-3, 0, 1000), 250.0, {"status": "finished"})]
    lines = _others_split(results, ["full", "lost"], 1000)
    assert "| lost | 0.001: 200.0 | 0.002 / 0.001: 190.0, 0.004 / 0.001: **185.0** |" in lines
    assert not any(line.startswith("| full") for line in lines)
    assert _others_split(results[:2], ["lost"], 1000) == []  # no split run yet: no section


@pytest.mark.parametrize("seconds, words", [(30, "1 minute"), (3000, "50 minutes"), (5399, "90 minutes"),
                                            (5400, "2 hours"), (3 * 3600, "3 hours")])
def test_the_time_left_reads_in_minutes_below_an_hour_and_a_half(seconds, words):
    from recipes.bench.quality.report import _fmt_duration

    assert _fmt_duration(seconds) == words
