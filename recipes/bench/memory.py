"""Measured peak memory of one training step against the ledger's prediction (fp32, CPU or CUDA).

Each configuration runs in a fresh process (so nothing of one run lingers in the next), does one
warm-up step (optimizer states exist from then on, as in any later step) and measures the next one.

    python -m recipes.bench.memory                      # LLaMA-60M and -130M shapes, batch 1 x 256
    python -m recipes.bench.memory --sizes llama_60m --batch-size 4
    python -m recipes.bench.memory --head plain         # transformers' own LM head and loss

The loss is computed by the lean head (``lsparam.lean_head``, the recipe's default) unless ``--head plain``;
the ledger is told which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from recipes.bench import HEADS, add_head_flag, run_module

RUNS = [  # (method, state bits, per-layer)
    ("full", 32, False),
    ("full", 8, True),
    ("lowrank", 32, False),
    ("sltrain", 32, False),
    ("lost", 32, False),
    ("cola", 32, False),
    ("sltrain", 8, True),
    ("lost", 8, True),
    ("cola", 8, True),
]


def one_run(size: str, method: str, bits: int, per_layer: bool, batch_size: int, seq_len: int, head: str) -> dict:
    """Measure one configuration (runs inside the child process)."""
    from lsparam.memory import estimate, measure
    from recipes.bench.training import build_training_step

    lean = head == "lean"
    built = build_training_step(size, method, batch_size=batch_size, seq_len=seq_len, state_bits=bits,
                                per_layer=per_layer, lean_head=lean)
    built.step()
    start = time.perf_counter()
    measured = measure(built.step, device=built.device)
    seconds = time.perf_counter() - start
    predicted = estimate(built.model, state_bits=bits, per_layer=per_layer, param_dtype="fp32",
                         batch_size=batch_size, seq_len=seq_len, device=built.device.type, lean_head=lean)
    return {"size": size, "method": method, "bits": bits, "per_layer": per_layer, "measured": measured.peak,
            "predicted": predicted.total, "paper": predicted.paper, "params": predicted.parameter_count,
            "step_seconds": seconds, "device": built.device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["llama_60m", "llama_130m"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    add_head_flag(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.child:
        size, method, bits, per_layer = json.loads(args.child)
        print(json.dumps(one_run(size, method, bits, per_layer, args.batch_size, args.seq_len, args.head)))
        return

    results = []
    for size in args.sizes:
        for method, bits, per_layer in RUNS:
            child = json.dumps([size, method, bits, per_layer])
            out = run_module("recipes.bench.memory", "--child", child, "--batch-size", str(args.batch_size),
                             "--seq-len", str(args.seq_len), "--head", args.head)
            if out.returncode:
                sys.exit(f"run {child} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{size} {method:8s} {bits:2d}-bit per_layer={per_layer!s:5s} measured {result['measured'] / 2**20:8.1f} MiB "
                  f"predicted {result['predicted'] / 2**20:8.1f} MiB", flush=True)

    mib = 2**20
    lines = [
        (f"Peak memory of one training step (forward, backward, AdamW update), fp32, batch {args.batch_size} x "
        f"{args.seq_len} tokens, {HEADS[args.head]}, measured with `lsparam.memory.measure` (CPU: the allocator's allocation and free "
        f"events; CUDA: `max_memory_allocated`), against `lsparam.memory.estimate`. Ratios are to full-rank AdamW "
        f"(32-bit states) of the same size."),
        "",
        "| size | method | states | per-layer | params (M) | measured (MiB) | vs full-rank | predicted (MiB) | predicted / measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        base = next(r for r in results if r["size"] == size and r["method"] == "full" and r["bits"] == 32)
        for r in (r for r in results if r["size"] == size):
            lines.append(
                f"| {size} | {r['method']} | {r['bits']}-bit | {'yes' if r['per_layer'] else 'no'} | {r['params'] / 1e6:.1f} | "
                f"{r['measured'] / mib:.1f} | {r['measured'] / base['measured']:.2f} | {r['predicted'] / mib:.1f} | "
                f"{r['predicted'] / r['measured']:.3f} |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("memory", "Memory of one training step: measured and predicted", table))


if __name__ == "__main__":
    main()
