"""Plot the loss curves of one or more training runs (each a directory holding ``metrics.jsonl``).

    python recipes/plot.py runs/llama_9m-lost runs/llama_9m-full --out compare.png
    python recipes/plot.py runs/* --x steps --smooth 50

Training loss is drawn as a line (a moving average over ``--smooth`` steps), validation loss as markers
joined by a dashed line, both against tokens seen (or steps). Runs are labelled by their directory name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of one run's ``metrics.jsonl``, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {str(run_dir)!r}: is it a run directory of recipes/pretrain.py?")
    records = parse_metrics(path.read_text())
    return [r for r in records if r.get("type") == "train"], [r for r in records if r.get("type") == "eval"]


def parse_metrics(text: str, *, source: str = "metrics.jsonl") -> list[dict]:
    """The records of a ``metrics.jsonl`` text. A last line cut short (a run killed or a disk full while
    writing it) is dropped with a note on stderr; a damaged line anywhere else is an error naming it.

    >>> parse_metrics('{"step": 1}\n{"step": 2}\n{"ste')
    [{'step': 1}, {'step': 2}]
    """
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"note: the last line of {source} was cut short (a write interrupted); dropped it",
                      file=sys.stderr)
                break
            raise ValueError(f"{source}, line {number}, is not a JSON record: {line[:80]!r}") from None
    return records


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs, out, *, labels=None, x: str = "tokens", smooth: int = 1, title: str | None = None) -> Path:
    """Draw every run's training and validation loss into one PNG at ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    if x not in ("tokens", "step"):
        raise ValueError(f"x must be 'tokens' or 'step'; got x={x!r}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1; got smooth={smooth}")
    run_dirs = [Path(r) for r in run_dirs]
    labels = labels or [r.resolve().name for r in run_dirs]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (run, label) in enumerate(zip(run_dirs, labels)):
        train, evals = read_metrics(run)
        color = f"C{i % 10}"
        if train:
            ax.plot([r[x] for r in train], _moving_average([r["loss"] for r in train], smooth),
                    color=color, alpha=0.8, linewidth=1.2, label=f"{label} train")
        if evals:
            ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], color=color, linestyle="--",
                    marker="o", markersize=4, label=f"{label} valid (ppl {evals[-1]['val_ppl']:.1f})")
    ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="loss_comparison.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--x", choices=("tokens", "step"), default="tokens", help="x axis (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window over training steps (default: 1)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run (default: directory names)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels needs one label per run: {len(args.runs)} runs, {len(args.labels)} labels")
    try:
        out = plot_runs(args.runs, args.out, labels=args.labels, x=args.x, smooth=args.smooth, title=args.title)
    except (FileNotFoundError, ValueError) as error:
        p.error(str(error))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
