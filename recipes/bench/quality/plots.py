"""The quality study's figures (PNGs in docs/benchmarks/), from the result files alone."""

from __future__ import annotations

from pathlib import Path

from recipes.bench.quality.plan import FULL_ONE_LR, Result, rows_of
from recipes.bench.quality.report import final_rows, ratio_series


def plot_ratios(series: dict, target: Path) -> Path:
    """Each row's perplexity over tuned full-rank's against the budget (:func:`ratio_series`), and the 1.02 target."""
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
    return _save(fig, target)


def _save(fig, target: Path) -> Path:
    import matplotlib.pyplot as plt

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
    return _save(fig, target)


def write_figures(results: list[Result], methods, figures: Path, model: str) -> list[tuple[str, Path]]:
    """The ratio plot and each budget's loss curves, from the finished runs, in ``figures``; as (alt text, path)."""
    rows = rows_of(methods)
    finished = [r for r in results if r.finished]
    written = []
    series = ratio_series(finished, rows)
    if series:
        written.append(("perplexity against tuned full-rank", plot_ratios(series, figures / "quality_ratio.png")))
    for tokens in sorted({r.run.tokens for r in finished}):
        curves = final_rows(finished, tokens, rows)
        target = figures / f"quality_{tokens}tok.png"
        written.append((f"loss curves, {tokens:,} tokens", plot_curves(curves, tokens, target, model)))
    return written
