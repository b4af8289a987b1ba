"""Training step: tokens/s and measured peak memory of a whole step (forward, backward, optimizer update).

LLaMA-20M and -60M shapes (the papers' 32000-token vocabulary), batch x 256 tokens, fp32 on CPU (bf16
on CUDA), each method at its per-size defaults x {AdamW with 32-bit states, 8-bit states with per-layer
updates} (AdamW is LeanOptimizer's default, torch's fused kernel; ``--unfused`` adds
the unfused loop for comparison). The loss is computed by the lean output head (``lsparam.lean_head``,
the recipe's default) unless ``--head plain``. Speed: the methods of a size with one optimizer (and mode) are
built in one fresh process, warmed up (``--warmup`` steps), then timed in turn for ``--repeats`` rounds (median
reported), so a slow spell of the shared machine hits their ratios alike. Memory: each configuration alone in a fresh process,
one step after warm-up measured by ``lsparam.memory.measure``. With
``--compile`` every size's models are also run under ``torch.compile`` (AdamW only; the whole
model, one graph for every method), to show what compiling changes; their ratios are to compiled
full-rank.

    python -m recipes.bench.step --compile --unfused      # writes the table into docs/benchmarks.md
    python -m recipes.bench.step --sizes llama_20m --methods full lost --no-write
    python -m recipes.bench.step --profile --sizes llama_60m --methods sltrain --optimizers adamw

``--profile`` runs the first size, method and optimizer given in this process under ``torch.profiler``
instead, and prints where a step's time goes (writes nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from lsparam.presets import METHODS as PRESET_METHODS
from lsparam.presets import VARIANTS
from recipes.bench import HEADS, add_head_flag, run_module

METHODS = [*PRESET_METHODS, *VARIANTS]  # cola-m: CoLA with its r-wide activations recomputed in backward
# name -> (state bits, per-layer updates, extra keywords); "adamw-unfused" shows what the fused default buys
OPTIMIZERS = {"adamw": (32, False, {}), "8bit-per-layer": (8, True, {}), "adamw-unfused": (32, False, {"foreach": False})}


def build_step(size: str, method: str, optimizer: str, compiled: bool, args):
    """A model of ``size`` with ``method`` and its optimizer; returns (one training step, parameter count)."""
    import torch

    from recipes.bench.training import build_training_step

    bits, per_layer, extra = OPTIMIZERS[optimizer]
    built = build_training_step(size, method, batch_size=args.batch_size, seq_len=args.seq_len, state_bits=bits,
                                per_layer=per_layer, optimizer_kwargs=extra, compiled=compiled,
                                lean_head=args.head == "lean", dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return built.step, built.parameter_count


def time_size(runs: list, args) -> list[dict]:
    """Tokens/s of every configuration of one size, built side by side in this process and timed in
    turn within each round: a slow spell of a shared machine lands on every configuration alike."""
    import torch

    steps, results = [], []
    for run in runs:
        step, params = build_step(*run, args)
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        steps.append(step)
        results.append({"size": run[0], "method": run[1], "optimizer": run[2], "compiled": run[3], "params": params,
                        "warmup_seconds": time.perf_counter() - started, "threads": torch.get_num_threads()})
    times = [[] for _ in runs]
    for _ in range(args.repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    for result, seconds in zip(results, times):
        result["step_seconds"] = statistics.median(seconds)
        result["tokens_per_s"] = args.batch_size * args.seq_len / result["step_seconds"]
    return results


def measure_one(run, args) -> dict:
    """Peak memory of one step after warm-up, alone in this process."""
    from lsparam.memory import measure

    step, _ = build_step(*run, args)
    for _ in range(args.warmup):
        step()
    return {"peak_bytes": measure(step).peak}


def profile_one(run, args) -> None:
    """Print the ops that take a step's time, from ``torch.profiler`` over ``--repeats`` steps after warm-up."""
    import torch

    step, _ = build_step(*run, args)
    for _ in range(args.warmup):
        step()
    with torch.profiler.profile() as profile:
        for _ in range(args.repeats):
            step()
    events = profile.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events) / args.repeats / 1e3
    sparse = sum(e.self_cpu_time_total for e in events if e.key.startswith("lsparam::")) / args.repeats / 1e3
    print(f"{' '.join(map(str, run[:3]))}: {total:.0f} ms of op time per step, lsparam's sparse kernels "
          f"{sparse:.0f} ms ({sparse / total:.1%})")


def child(mode: str, payload, args) -> None:
    """Run in a fresh process and print one JSON line (see main)."""
    print(json.dumps(time_size(payload, args) if mode == "time" else measure_one(payload, args)))


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["llama_20m", "llama_60m"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "8bit-per-layer"], choices=["adamw", "8bit-per-layer"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time each method under torch.compile (AdamW)")
    add_head_flag(parser)
    parser.add_argument("--unfused", action="store_true", help="also time AdamW's unfused loop (first size)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--profile", action="store_true", help="profile one configuration (see above); writes nothing")
    args = parser.parse_args()
    if args.profile:
        profile_one((args.sizes[0], args.methods[0], args.optimizers[0], False), args)
        return
    if args.child:
        child(args.child[0], json.loads(args.child[1]), args)
        return

    flags = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
             "--repeats", str(args.repeats), "--head", args.head]

    def in_child(mode: str, payload):
        out = run_module("recipes.bench.step", "--child", mode, json.dumps(payload), *flags)
        if out.returncode:
            sys.exit(f"{mode} {payload} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = []
    for size in args.sizes:
        # one timing process per optimizer and mode: a process holding every configuration of a 130M model
        # (17 GB with the compiled ones) ran each of them 2.5x slower than one holding a few
        groups = [[(size, m, o, False) for m in args.methods] for o in args.optimizers]
        if args.compile:
            groups.append([(size, m, "adamw", True) for m in args.methods])
        if args.unfused and size == args.sizes[0]:  # for one size only: it shows what the fused kernel buys
            groups.append([(size, m, "adamw-unfused", False) for m in args.methods])
        runs = [run for group in groups for run in group]
        timed = [result for group in groups for result in in_child("time", group)]
        for run, result in zip(runs, timed):
            result.update(in_child("memory", run))
            results.append(result)
            print(f"{run[0]} {run[1]:9s} {run[2]:15s} compiled={run[3]!s:5s} {result['tokens_per_s']:8.0f} tok/s "
                  f"{result['peak_bytes'] / 2**20:8.1f} MiB (warm-up {result['warmup_seconds']:.1f} s)", flush=True)

    def base(r):  # full-rank AdamW of the same size, compiled for compiled rows
        return next(b for b in results if (b["size"], b["method"], b["optimizer"], b["compiled"]) ==
                    (r["size"], "full", "adamw", r["compiled"]))

    lines = [
        (f"One training step (forward, backward, update) of a LLaMA of the papers' shapes (32000-token vocabulary), "
        f"batch {args.batch_size} x {args.seq_len} tokens, {'bf16 on CUDA' if torch_cuda() else 'fp32 on CPU'}, "
        f"{HEADS[args.head]}, "
        f"{results[0]['threads']} threads. Tokens/s: the median of {args.repeats} rounds after {args.warmup} warm-up steps, "
        f"the methods of a size timed in turn in each round (one process per size and optimizer or mode). Peak memory: each "
        f"configuration alone in a fresh process, one step measured with `lsparam.memory.measure`. Ratios "
        f"are to full-rank AdamW (32-bit states) of the same size, in the same run; compiled rows to compiled "
        f"full-rank."),
        "",
        "| size | method | optimizer | compiled | tokens/s | vs full-rank | peak (MiB) | vs full-rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = base(r)
        lines.append(
            f"| {r['size']} | {r['method']} | {r['optimizer']} | {'yes' if r['compiled'] else 'no'} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / b['tokens_per_s']:.2f} | {r['peak_bytes'] / 2**20:,.1f} | "
            f"{r['peak_bytes'] / b['peak_bytes']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("step", "Training step: tokens/s and peak memory", table))


if __name__ == "__main__":
    main()
