"""The memory ledger at the papers' sizes, against the memory SLTrain's paper measured (its Fig. 3).

At LLaMA-1B and -7B (bf16, batch 1 x 256 tokens, the papers' ranks and densities), ``lsparam.memory.estimate``
for full-rank Adam and for SLTrain with 8-bit states and per-layer updates, next to the paper's measured
peaks on one GPU (GB as the paper gives them; the ledger's in GiB and GB). The ledger's own accuracy is
checked against measured steps at 60M and 130M by ``python -m recipes.bench.memory``; these sizes do not
fit this machine, so this table compares the model with the paper, not with a measurement of ours.

    python -m recipes.bench.ledger              # writes the table into docs/benchmarks.md
    python -m recipes.bench.ledger --no-write
"""

from __future__ import annotations

import argparse

# SLTrain paper (Han et al., NeurIPS 2024), Fig. 3: peak memory measured on one A100, in GB
PAPER_GB = {
    ("llama_1b", "full"): 16.3,
    ("llama_1b", "sltrain"): 6.8,
    ("llama_7b", "full"): 67.4,
    ("llama_7b", "sltrain"): 18.3,
}
PAPER_GALORE_7B_GB = 22.0  # 8-bit GaLore, per-layer, same figure
ROWS = [  # (method, state bits, per-layer): the paper's two configurations
    ("full", 32, False),
    ("sltrain", 8, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    from lsparam.memory import estimate

    lines = [
        ("`lsparam.memory.estimate` at the papers' settings (bf16 weights, batch 1 x 256 tokens; SLTrain r 512, "
         "δ 0.03 at 1B and r 1024, δ 0.05 at 7B, α 8) for full-rank Adam (32-bit, i.e. bf16, states) and SLTrain "
         "with 8-bit states and per-layer updates, on CPU and on CUDA (which keeps SLTrain's transposed CSR "
         "support), against the peaks the SLTrain paper measured (Fig. 3; its 8-bit GaLore at 7B: "
         f"{PAPER_GALORE_7B_GB} GB)."),
        "",
        "| size | method | states | per-layer | ledger, CPU (GiB) | ledger, CUDA (GiB) | ledger, CUDA (GB) | paper (GB) | "
        "weights + states + indices (GiB) | activations (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in ("llama_1b", "llama_7b"):
        for method, bits, per_layer in ROWS:
            cpu, cuda = (estimate(size, method, state_bits=bits, per_layer=per_layer, device=device)
                         for device in ("cpu", "cuda"))
            lines.append(
                f"| {size} | {method} | {bits}-bit | {'yes' if per_layer else 'no'} | {cpu.total / 2**30:.2f} | "
                f"{cuda.total / 2**30:.2f} | {cuda.total / 1e9:.1f} | {PAPER_GB[(size, method)]} | "
                f"{cuda.paper / 2**30:.2f} | {cuda.activations / 2**30:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("ledger", "Memory ledger at 1B and 7B against the SLTrain paper", table))


if __name__ == "__main__":
    main()
