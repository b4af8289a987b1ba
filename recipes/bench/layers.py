"""Layer speed: forward + backward of one layer against a dense ``nn.Linear``.

2048 tokens, fp32 on CPU (bf16 on CUDA when a GPU is there), LLaMA shapes, rank = 1/4 of the smaller
side, SLTrain density 0.03, LOST channel ratio 0.05. Each figure is the median of ``--repeats`` timed
rounds after warm-up (every layer timed once per round, in turn), reported as a ratio to dense measured
in the same rounds, next to its floor (the method's multiply-adds over dense multiply-adds).

    python -m recipes.bench.layers                 # writes the table into docs/benchmarks.md
    python -m recipes.bench.layers --shapes 1024x2736 --repeats 5 --no-write
"""

from __future__ import annotations


import argparse
import contextlib
import functools

import torch
from torch import nn

import lsparam
from lsparam.methods.sltrain import sltrain_nnz
from lsparam.sparse import native
from recipes.bench.timing import median_seconds

WITHOUT_NATIVE = "lsparam SLTrain (gather, embedding_bag)"  # timed with lsparam.sparse.native.disabled()
SHAPES = ["768x768", "1024x2736", "2736x1024", "2048x2048", "2048x5461"]  # out x in


class NaiveSLTrain(nn.Module):
    """``torch.nn.utils.parametrize`` the plain way: the parametrization returns the dense W."""

    def __init__(self, factors, support, scale):
        super().__init__()
        self.B, self.A, self.values = (nn.Parameter(f.detach().clone()) for f in factors)
        self.support, self.scale = support, scale

    def forward(self, _):
        return self.scale * (self.B @ self.A) + self.support.to_dense(self.values)


def variants(out_features: int, in_features: int, device, dtype):
    """name -> (layer, multiply-adds per token of its forward)."""
    rank = min(out_features, in_features) // 4
    dense_macs = out_features * in_features
    nnz = sltrain_nnz(0.03, out_features, in_features)
    channels = max(1, int(0.05 * in_features))

    def make(config):
        torch.manual_seed(0)
        layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        return lsparam.parametrize(layer, config, target_modules=None) if config is not None else layer

    out = {"dense": (make(None), dense_macs)}
    sltrain = make(lsparam.SLTrainConfig(rank=rank, density=0.03, sparse_backend="scatter"))
    p = sltrain.parametrizations.weight[0]
    naive = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    factors = [getattr(sltrain.parametrizations.weight, f"original{i}") for i in range(3)]
    torch.nn.utils.parametrize.register_parametrization(naive, "weight", NaiveSLTrain(factors, p.support, p.scale), unsafe=True)
    out["naive parametrize (SLTrain)"] = (naive, dense_macs + rank * (in_features + out_features))
    out["lsparam low-rank"] = (make(lsparam.LowRankConfig(rank=rank)), rank * (in_features + out_features))
    backends = ["gather", "csr", "scatter"] if dtype in (torch.float32, torch.float64) or device.type == "cuda" else ["gather", "scatter"]
    for backend in backends:
        config = lsparam.SLTrainConfig(rank=rank, density=0.03, sparse_backend=backend)
        out[f"lsparam SLTrain ({backend})"] = (make(config), rank * (in_features + out_features) + nnz)
    if native.available(torch.zeros(1, device=device, dtype=dtype)):  # what the native kernels change
        config = lsparam.SLTrainConfig(rank=rank, density=0.03, sparse_backend="gather")
        out[WITHOUT_NATIVE] = (make(config), rank * (in_features + out_features) + nnz)
    lost_macs = rank * (in_features + out_features) + channels * out_features
    out["lsparam LOST"] = (make(lsparam.LOSTConfig(rank=rank, channel_ratio=0.05)), lost_macs)
    out["lsparam LOST-SiLU"] = (make(lsparam.LOSTConfig(rank=rank, channel_ratio=0.05, activation="silu")), lost_macs)
    out["lsparam CoLA"] = (make(lsparam.CoLAConfig(rank=rank)), rank * (in_features + out_features))
    return out


def time_fwd_bwd(layers: dict, x, grad, repeats: int) -> dict:
    """Median seconds of forward + backward per layer, timed in turn within rounds (``median_seconds``).
    The backward starts from ``grad``, a dense output gradient as in training (``y.sum()``'s would be a
    stride-0 view)."""
    def run(layer):
        layer.zero_grad(set_to_none=True)
        with native.disabled() if layer is layers.get(WITHOUT_NATIVE) else contextlib.nullcontext():
            layer(x).backward(grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return median_seconds({name: functools.partial(run, layer) for name, layer in layers.items()}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="out x in, e.g. 1024x2736")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    rows = []
    for shape in args.shapes:
        out_features, in_features = (int(s) for s in shape.split("x"))
        x = torch.randn(args.tokens, in_features, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, out_features, device=device, dtype=dtype)
        layers = variants(out_features, in_features, device, dtype)
        seconds = time_fwd_bwd({name: layer for name, (layer, _) in layers.items()}, x, grad, args.repeats)
        dense_macs = layers["dense"][1]
        for name, (_, macs) in layers.items():
            rows.append((shape, name, seconds[name] * 1e3, seconds[name] / seconds["dense"], macs / dense_macs))
            print(f"{shape:>10} {name:<28} {seconds[name] * 1e3:8.2f} ms  {seconds[name] / seconds['dense']:.2f}x dense "
                  f"(floor {macs / dense_macs:.2f})", flush=True)

    lines = [
        f"Forward + backward (from a random output gradient, input gradient included) of one layer, {args.tokens} "
        f"tokens, {str(dtype).removeprefix('torch.')} on {device.type}, "
        f"rank = 1/4 of the smaller side, SLTrain δ = 0.03, LOST ρ = 0.05; median of {args.repeats} rounds after "
        f"warm-up, the layers timed in turn in each round. *Floor*: the method's multiply-adds over dense multiply-adds. "
        f"SLTrain *(gather)* runs lsparam's native kernels (`lsparam.sparse.native`); *(gather, embedding_bag)* is the "
        f"same path with them switched off (`native.disabled()`), PyTorch's embedding_bag route.",
        "",
        "| shape (out×in) | layer | ms | time / dense | floor |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {n} | {ms:.2f} | {ratio:.2f} | {floor:.2f} |" for s, n, ms, ratio, floor in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from recipes.bench.report import write_section

        print("wrote", write_section("layers", "Layer speed: forward + backward against dense", table))


if __name__ == "__main__":
    main()
