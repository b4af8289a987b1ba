"""recipes/bench/quality.py: its selection logic, and its ``--quick`` mode end to end on a corpus made here.

The quick run trains real (tiny) models in subprocesses; its report is checked against the runs'
own summary.json files, not against figures written down in advance.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

from recipes.bench import quality

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ppl_by_lr, expected", [
    ({1e-3: 30.0, 2e-3: 25.0, 4e-3: 27.0}, None),            # best inside the grid: done
    ({1e-3: 30.0, 2e-3: 25.0, 4e-3: 24.0}, 8e-3),            # best at the top: go higher
    ({1e-3: 24.0, 2e-3: 25.0, 4e-3: math.inf}, 5e-4),        # best at the bottom: go lower
    ({1e-3: 30.0, 2e-3: math.inf}, 5e-4),                    # the top diverged: below is the only way
    ({1e-3: 25.0}, None),                                    # one rate says nothing about edges
])
def test_edge_extension_moves_toward_the_better_side(ppl_by_lr, expected):
    result = quality.edge_extension(ppl_by_lr)
    assert result == (None if expected is None else pytest.approx(expected))


def test_best_lr_picks_the_lowest_perplexity_of_the_matching_runs():
    Run, Result = quality.Run, quality.Result
    results = [Result(Run("lost", lr, seed, tokens), ppl, None, None) for lr, seed, tokens, ppl in [
        (1e-3, 0, 100, 40.0), (3e-3, 0, 100, 35.0), (1e-2, 0, 100, math.inf),
        (1e-2, 1, 100, 10.0),  # another seed: not part of the sweep
        (1e-2, 0, 400, 10.0),  # another budget: not part of the sweep
    ]]
    assert quality.best_lr(results, "lost", 0, 100) == 3e-3
    assert quality.best_lr(results, "full", 0, 100) is None


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree red blue and then it was big small".split()
    for name, count in (("train.txt", 4000), ("valid.txt", 800)):
        (root / name).write_text(" ".join(rng.choice(words) for _ in range(count)))
    out = root / "runs"
    argv = ["--quick", "--no-write", "--data-files", str(root / "train.txt"), "--valid-files", str(root / "valid.txt"),
            "--out", str(out), "--figures", str(root / "figures")]
    return quality.main(argv), out, argv


def test_quick_study_sweeps_then_repeats_the_best_rate(quick_study):
    results, out, _ = quick_study
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in out.iterdir() if (d / "summary.json").exists()}
    for method, grid in quality.QUICK_GRIDS.items():
        sweep = {lr: summaries[quality.Run(method, lr, 0, 2048).name]["final_val_ppl"] for lr in grid}
        best = min(sweep, key=sweep.get)
        # the second seed and the long budget ran at the sweep's best rate, and only there
        assert quality.Run(method, best, 1, 2048).name in summaries
        assert quality.Run(method, best, 0, 4096).name in summaries
        assert not any(n.startswith(f"{method}-lr") and "seed1" in n and f"lr{best:g}-" not in n for n in summaries)
        rows = quality.final_rows(results, 2048, quality.QUICK_GRIDS)
        expected = statistics.mean(summaries[quality.Run(method, best, s, 2048).name]["final_val_ppl"] for s in (0, 1))
        assert rows[method]["lr"] == best
        assert rows[method]["ppl"] == pytest.approx(expected)


def test_quick_study_is_not_rerun_and_reports_from_disk(quick_study, capsys):
    results, out, argv = quick_study
    stamps = {p: p.stat().st_mtime for p in out.glob("*/summary.json")}
    again = quality.main(argv + ["--report-only"])
    assert {p: p.stat().st_mtime for p in out.glob("*/summary.json")} == stamps  # nothing retrained
    assert sorted(r.run.name for r in again) == sorted(r.run.name for r in results)
    report = capsys.readouterr().out
    full_linear = next(quality.linear_parameters(r.summary) for r in results if r.run.method == "full")
    lost = next(r for r in results if r.run.method == "lost")
    assert f"{quality.linear_parameters(lost.summary) / full_linear:.2f}" in report
    assert "At the longest budget so far (4,096 tokens)" in report


def test_report_only_without_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        quality.main(["--quick", "--report-only", "--no-write", "--out", str(tmp_path)])


def test_the_corpus_is_required_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--quick", "--no-write", "--data-files", "x.txt", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--valid-files required: the corpus to train and validate on" in capsys.readouterr().err


def test_runs_as_a_module_from_the_repository_root(tmp_path):
    """``python -m recipes.bench.quality`` (its imports are the package's)."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "recipes.bench.quality", "--report-only",
                             "--no-write", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 1 and "no finished runs" in result.stderr, result.stderr[-2000:]
