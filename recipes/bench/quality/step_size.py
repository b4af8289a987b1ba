"""How far one optimizer step moves each part of the model, at each method's best rate.

One way to ask why the methods rank as they do at short budgets: how far does one optimizer step move
each part of the model at each configuration's rates? The decoder's linear layers are each method's own
(dense, factorised, sparse), the embeddings and head are dense in every method, and with one learning rate
for the whole model a method cannot move them independently (``--linear-lr-scale`` can).

This replays the first steps of each configuration's 1M-token run (the same command, seed and data order,
hence the same schedule: the peak rate is reached at the end of the warm-up) and measures, at each step of
the window after the warm-up, the relative change of

- each decoder linear layer's output on the inputs it just saw, ``‖f_new(x) − f_old(x)‖ / ‖f_old(x)‖``;
- the embedding rows of the batch's tokens, ``‖ΔE‖ / ‖E‖`` over those rows;
- the output head's logits on the final hidden states it just saw.

Each figure is the median over the window's steps (the decoder's: the mean over its layers first). Results go
to ``<results>/why/step_size.json``; the report (:func:`step_section`) renders them. Run it after the 1M
sweep::

    python -m recipes.bench.quality.step_size --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path

from recipes.bench import ROOT
from recipes.bench.quality.plan import Result, best_run

WINDOW = 32  # steps measured after the warm-up
FILE = Path("why") / "step_size.json"  # under the results folder; read_results reads only its top level


def configurations(results: list[Result], short: int) -> list[Result]:
    """What to measure: each method's best run at the short budget (seed 0), and every other finished
    full-rank run there (its other rates, split, warmup and init: what moves full-rank)."""
    chosen = {}
    for method in dict.fromkeys(r.run.method for r in results):
        best = best_run(results, method, short)
        if best is not None:
            chosen[best] = None
    for r in results:
        if (r.run.method, r.run.seed, r.run.tokens) == ("full", 0, short):
            chosen[r.run] = None
    by_run = {r.run: r for r in results}
    return [by_run[run] for run in chosen if by_run[run].finished and by_run[run].record.get("command")]


def replay(command: list[str], window: int = WINDOW) -> dict:
    """Train the first steps of the run ``command`` (``recipes/pretrain.py`` and its flags, as a result file
    records them) and measure each step of ``window`` steps after its warm-up. Returns the medians over the
    window: ``decoder`` (and ``decoder_by_kind``), ``embedding``, ``head``, and the step losses, which equal
    the original run's (same seed, data and schedule)."""
    from recipes import pretrain
    from recipes.flags import build_parser, check_args

    # the recorded paths are relative to the repository root; a fresh --out: nothing to resume
    with tempfile.TemporaryDirectory() as out, contextlib.chdir(ROOT):
        args = check_args(build_parser().parse_args(command[1:] + ["--out", out, "--eval-every", "0", "--save-every", "0"]))
        run = pretrain.setup(args)
        warmup = int(args.warmup * run.total_steps)
        if warmup + window > run.total_steps:
            raise ValueError(f"window={window}: the run has {run.total_steps} steps, {warmup} of them warm-up; "
                             f"at most {run.total_steps - warmup} can be measured after it")
        model = run.raw
        kinds = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        decoder, by_kind, embed, logits, losses = [], {}, [], [], []
        batches = iter(run.data.train)
        for step in range(warmup + window):
            x = next(batches)
            if step < warmup:
                losses.append(train_step(model, run.optimizer, run.scheduler, x))
                continue
            loss, changes, head_change, embedding_change = step_changes(model, run.optimizer, run.scheduler, x)
            losses.append(loss)
            logits.append(head_change)
            decoder.append(statistics.fmean(changes.values()))
            embed.append(embedding_change)
            for m, change in changes.items():
                by_kind.setdefault(kinds[id(m)], []).append(change)
    return {"decoder": statistics.median(decoder), "embedding": statistics.median(embed), "head": statistics.median(logits),
            "decoder_by_kind": {kind: statistics.median(v) for kind, v in by_kind.items()},
            "steps": [warmup, warmup + window], "peak_lr": args.lr, "losses": losses}


def train_step(model, optimizer, scheduler, x) -> float:
    """One step of recipes/pretrain.py's loop (no accumulation): returns the loss."""
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def step_changes(model, optimizer, scheduler, x) -> tuple[float, dict, float, float]:
    """One training step on ``x`` and what it changed: ``(loss, {decoder linear layer: relative change of
    its output on the input it saw}, relative change of the head's logits on the final hidden states,
    relative change of the embedding rows of x's tokens)``. The head is read through its weight: the
    recipe's lean head computes the loss without calling it."""
    import torch
    import torch.nn.functional as F

    from recipes.pretrain import decoder_linears

    seen, last = {}, {}  # decoder linear -> its (input, output) in this step's forward; the last hidden state
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0].detach(), o.detach())))
             for m in decoder_linears(model)]
    hooks.append(model.base_model.register_forward_hook(lambda m, i, o: last.__setitem__("hidden", o[0].detach())))
    try:
        head, embedding, rows = model.get_output_embeddings(), model.get_input_embeddings(), x.unique()
        head_before, rows_before = head.weight.detach().clone(), embedding.weight[rows].detach().clone()
        loss = train_step(model, optimizer, scheduler, x)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        hidden = last["hidden"]
        head_change = _relative(F.linear(hidden, head.weight), F.linear(hidden, head_before))
        changes = {m: _relative(m(inputs), outputs) for m, (inputs, outputs) in seen.items()}
        return loss, changes, head_change, _relative(embedding.weight[rows], rows_before)


def replay_difference(losses: list[float], record: dict) -> float | None:
    """The largest relative difference between the replay's training losses and the run's own, over the
    stretches of the result file's thinned curve (mean loss per stretch of steps) that the replay covers."""
    curve, per_step = record["train_loss"], record["tokens"] // record["steps"]
    differences, start = [], 0
    for tokens, mean_loss in curve:
        end = tokens // per_step
        if end > len(losses):
            break
        differences.append(abs(statistics.fmean(losses[start:end]) / mean_loss - 1))
        start = end
    return max(differences) if differences else None


def _relative(new, old) -> float:
    return ((new - old).norm() / old.norm()).item()


def write(results: list[Result], results_dir, short: int, window: int = WINDOW) -> Path:
    """Measure every configuration (:func:`configurations`) not yet in ``<results_dir>/why/step_size.json``
    (measured with the same window) and write the file."""
    from tqdm import tqdm

    path = Path(results_dir) / FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    measured = old["runs"] if (old.get("window"), old.get("tokens")) == (window, short) else {}
    todo = [r for r in configurations(results, short) if r.run.name not in measured]
    for r in tqdm(todo, desc="step sizes"):
        replayed = replay(r.record["command"], window)
        measured[r.run.name] = {"label": r.run.label(), "method": r.run.method, "ppl": r.ppl,
                                "replay_vs_run": replay_difference(replayed.pop("losses"), r.record), **replayed}
        path.parent.mkdir(parents=True, exist_ok=True)  # after each: an interrupted measurement keeps what it has
        path.write_text(json.dumps({"window": window, "tokens": short, "runs": measured}, indent=1) + "\n")
    return path


def step_section(results_dir, budget: str) -> list[str]:
    """The report's section on step sizes, from ``<results_dir>/why/step_size.json`` (none if absent)."""
    path = Path(results_dir) / FILE
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    runs = sorted(data["runs"].values(), key=lambda m: (m["method"] != "full", m["method"], m["peak_lr"], m["label"]))
    lines = [f"### Why: how far one step moves each part ({budget} tokens)", "",
             f"Each configuration's run replayed from its start (same seed, data and schedule; "
             f"`python -m recipes.bench.quality.step_size`), measured over the {data['window']} steps after the warm-up "
             f"(the peak rate): the relative change one optimizer step makes to the decoder's linear layers' outputs on "
             f"the inputs they just saw (mean over the layers), to the embedding rows of the batch's tokens, and to the "
             f"head's logits; each the median over the steps.", "",
             "| method | configuration | decoder layers | embeddings | head logits | valid ppl |", "|---|---|---|---|---|---|"]
    for m in runs:
        changes = " | ".join(_percent(m[part]) for part in ("decoder", "embedding", "head"))
        lines.append(f"| {m['method']} | {m['label']} | {changes} | {m['ppl']:.1f} |")
    lines.append("")
    return lines


def _percent(fraction: float) -> str:
    """0.0331 -> "3.3%", 0.0051 -> "0.51%": two significant digits or more."""
    return f"{100 * fraction:.1f}%" if fraction >= 0.01 else f"{100 * fraction:.2f}%"


def main(argv=None) -> Path:
    from recipes.bench.passages import write_passages
    from recipes.bench.quality.cli import RESULTS, TRAIN_SHARDS
    from recipes.bench.quality.results import read_results

    p = argparse.ArgumentParser(prog="python -m recipes.bench.quality.step_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-files", required=True, help="the study's training text files (glob)")
    p.add_argument("--valid-files", required=True, help="the study's validation text files (glob)")
    p.add_argument("--results", default=str(RESULTS), help="the study's result files (default: %(default)s)")
    p.add_argument("--window", type=int, default=WINDOW, help="steps measured after the warm-up (default: %(default)s)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be at least 1 step; got {args.window}")
    results = [r for r in read_results(args.results) if r.record.get("command")]
    if not results:
        raise SystemExit(f"no result files with their command in {args.results}: run the study first")
    short = min(r.run.tokens for r in results)
    setup = results[0].record["setup"]
    command = results[0].record["command"]  # its passages: <out>/corpus/{train,valid}/*.jsonl, rebuilt if missing
    out = ROOT / Path(command[command.index("--data-files") + 1]).parent.parent
    write_passages(args.data_files, out / "train", shards=TRAIN_SHARDS, passage_chars=setup["passage_chars"])
    write_passages(args.valid_files, out / "valid", shards=1, passage_chars=setup["passage_chars"])
    path = write(results, args.results, short, args.window)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
