"""SLTrain's sparse products alone, each against one dense GEMM of the same shape.

The three products of a sparse layer ``y = x Sᵀ`` (δ = 0.03, uniform random support, fp32 on CPU):
the forward, ``dX = dY S`` and ``dV`` (one dot product per entry), through ``lsparam.sparse.matmul`` as the
SLTrain layer calls them: lsparam's native kernels, and the ``embedding_bag`` route they replace (timed
under ``native.disabled()``). ``dX`` includes making the transpose of the support it runs on, as each
call does (the support holds 2 bytes per entry and no transposed copy). Each figure is the median of
``--repeats`` rounds after warm-up, every product timed in turn within a round, as a ratio to ``x @ Wᵀ``
(one dense GEMM, tokens × out × in) in the same rounds. A dense layer's forward + backward is three such
GEMMs; the FLOP floor of each sparse product is δ = 0.03 of one.

    python -m recipes.bench.kernels                                  # writes its table into docs/benchmarks.md
    python -m recipes.bench.kernels --shapes 512x512 --tokens 1024 --no-write
"""

from __future__ import annotations

import argparse

import torch

from lsparam.methods.sltrain import sltrain_nnz
from lsparam.sparse import native
from lsparam.sparse.matmul import bag_sum, entry_dots, input_grad
from lsparam.sparse.support import SparseSupport, uniform_flat_indices
from recipes.bench.layers import SHAPES  # the layer benchmark's shapes
from recipes.bench.timing import median_seconds

DENSITY = 0.03


def products(out_features: int, in_features: int, tokens: int) -> dict:
    """name -> a call running one product (or the dense GEMM), on fixed random data."""
    generator = torch.Generator().manual_seed(0)
    nnz = sltrain_nnz(DENSITY, out_features, in_features)
    support = SparseSupport(uniform_flat_indices(out_features * in_features, nnz, 0), (out_features, in_features), persistent=False)
    values = torch.randn(nnz, generator=generator)
    x = torch.randn(tokens, in_features, generator=generator)
    grad = torch.randn(tokens, out_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    out, grad_x = torch.zeros(tokens, out_features), torch.zeros(tokens, in_features)
    return {
        "dense GEMM": lambda: x @ weight.t(),
        "forward": lambda: bag_sum(x, support.crow_indices, support.col_indices, values, out_features, out=out),
        "dX": lambda: input_grad(grad, values, support, out=grad_x),
        "dV": lambda: entry_dots(grad, x, support),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="out x in, e.g. 1024x2736")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if not native.available(torch.zeros(1)):
        parser.error("the native kernels are not built here (no C++ compiler?): nothing to compare")

    routes = ("native", "embedding_bag")
    rows = []
    for shape in args.shapes:
        out_features, in_features = (int(s) for s in shape.split("x"))
        calls = products(out_features, in_features, args.tokens)
        timed = {"dense GEMM": calls.pop("dense GEMM")}
        for name, call in calls.items():
            timed[f"{name} (native)"] = call

            def without_native(call=call):
                with native.disabled():
                    call()

            timed[f"{name} (embedding_bag)"] = without_native
        seconds = median_seconds(timed, args.repeats)
        gemm = seconds["dense GEMM"]
        for product in calls:
            ratios = [seconds[f"{product} ({route})"] / gemm for route in routes]
            rows.append((shape, product, *ratios))
            print(f"{shape:>10} {product:<8} native {ratios[0]:.3f}  embedding_bag {ratios[1]:.3f}  x one GEMM", flush=True)

    lines = [
        (f"Each sparse product of a layer `y = x Sᵀ` alone ({args.tokens} tokens, float32, δ = {DENSITY}, uniform random "
        f"support), as a ratio to one dense GEMM `x Wᵀ` timed in the same rounds (a dense layer's forward + backward "
        f"is three of them; the FLOP floor of each product is {DENSITY}; *dX* includes transposing the support, which "
        f"each call does). Median of {args.repeats} rounds after warm-up. "
        f"*native*: lsparam's kernels (`lsparam/sparse/native.cpp`); *embedding_bag*: the same calls under "
        f"`native.disabled()`."),
        "",
        "| shape (out×in) | product | native | embedding_bag |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {p} | {a:.3f} | {b:.3f} |" for s, p, a, b in rows]
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("kernels", "Sparse kernels: each product against one dense GEMM", "\n".join(lines)))


if __name__ == "__main__":
    main()
