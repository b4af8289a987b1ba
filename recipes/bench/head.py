"""The lean output head: step time and peak memory of a training step with and without it.

``lsparam/lean_head.py`` computes the LM head and the loss in chunks of tokens, so the ``tokens x 32000``
logits never exist whole. This measures a full-rank LLaMA step (the head is the same for every method)
at 20M and 60M shapes, batch x 256 tokens, fp32 on CPU (bf16 on CUDA), with AdamW: step time as the
median of ``--repeats`` rounds, both heads built in one process and timed in turn within each round;
peak memory of each alone in a fresh process (``lsparam.memory.measure``).

    python -m recipes.bench.head              # writes its table into docs/benchmarks.md
    python -m recipes.bench.head --sizes llama_20m --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from recipes.bench import run_module

HEADS = ("plain", "lean")


def build(size: str, head: str, args):
    import torch

    from recipes.bench.training import build_training_step

    return build_training_step(size, args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                               dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                               lean_head=head == "lean").step


def time_both(size: str, args) -> dict:
    steps = {head: build(size, head, args) for head in HEADS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {head: [] for head in HEADS}
    for _ in range(args.repeats):
        for head, step in steps.items():
            started = time.perf_counter()
            step()
            times[head].append(time.perf_counter() - started)
    return {head: statistics.median(t) for head, t in times.items()}


def peak(size: str, head: str, args) -> int:
    from lsparam.memory import measure

    step = build(size, head, args)
    for _ in range(args.warmup):
        step()
    return measure(step).peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["llama_20m", "llama_60m"])
    parser.add_argument("--method", default="full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.child:
        mode, size, head = args.child
        print(json.dumps(time_both(size, args) if mode == "time" else peak(size, head, args)))
        return

    flags = ["--method", args.method, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--warmup", str(args.warmup), "--repeats", str(args.repeats)]

    def in_child(*child):
        out = run_module("recipes.bench.head", "--child", *child, *flags)
        if out.returncode:
            sys.exit(f"{child} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    lines = [
        f"One training step of a {args.method} LLaMA (AdamW), batch {args.batch_size} x {args.seq_len} tokens, "
        f"{'bf16 on CUDA' if torch.cuda.is_available() else 'fp32 on CPU'}: the plain head (`transformers`' "
        f"logits, then the loss) against the lean head (`lsparam/lean_head.py`, chunks of 1024 tokens). Step "
        f"time: median of {args.repeats} rounds, both timed in turn in one process. Peak: each alone in a fresh "
        f"process (`lsparam.memory.measure`).",
        "",
        "| size | head | step (ms) | vs plain | peak (MiB) | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        seconds = in_child("time", size, "-")
        peaks = {head: in_child("memory", size, head) for head in HEADS}
        for head in HEADS:
            lines.append(f"| {size} | {head} | {seconds[head] * 1e3:,.0f} | {seconds[head] / seconds['plain']:.2f} | "
                         f"{peaks[head] / 2**20:,.1f} | {peaks[head] / peaks['plain']:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("head", "Lean output head: step time and peak memory", table))


if __name__ == "__main__":
    main()
