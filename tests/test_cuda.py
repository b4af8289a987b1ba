"""What only a CUDA GPU can check: bf16 layers of every method against float64 math (bf16 weights, and float32
weights under autocast), the CUDA sparse
backends, the memory ledger against the CUDA allocator, and the recipe in bf16 (8-bit states, FSDP2 over
NCCL on one rank). Skipped without CUDA; ``recipes/bench/gpu_check.sh`` runs them with the GPU benchmarks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lsparam
from lsparam.testing import reference_forward
from tests.recipe_runs import common, read_metrics, run_script

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIGS = {
    "lowrank": lsparam.LowRankConfig(rank=32),
    "sltrain-csr": lsparam.SLTrainConfig(rank=32, density=0.03, sparse_backend="csr"),
    "sltrain-scatter": lsparam.SLTrainConfig(rank=32, density=0.03, sparse_backend="scatter"),
    "sltrain-gather": lsparam.SLTrainConfig(rank=32, density=0.03, sparse_backend="gather"),
    "lost": lsparam.LOSTConfig(rank=32),
    "lost-silu": lsparam.LOSTConfig(rank=32, activation="silu"),
    "cola": lsparam.CoLAConfig(rank=32),
}


def structured_cuda_layer(name, dtype):
    """A 384 -> 256 layer of ``name`` on CUDA in ``dtype``, its parametrization and factors, every factor a
    little off its init: SLTrain starts with B = 0, where A's gradient is zero (and its relative error 0/0)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 256, bias=False, device="cuda", dtype=dtype)
    lsparam.parametrize(layer, CONFIGS[name], target_modules=None)
    p = layer.parametrizations.weight[0]
    factors = [getattr(layer.parametrizations.weight, f"original{i}") for i in range(len(p.factor_names))]
    generator = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for factor in factors:
            factor.add_(0.05 * torch.randn(factor.shape, device=factor.device, generator=generator).to(factor.dtype))
    return layer, p, factors


def assert_matches_float64(name, p, factors, x, y, grad):
    """``y`` and the gradients of ``x`` and the factors against the published formula in float64 on the CPU,
    within 3% (of the output's scale; relative for each gradient)."""
    x64 = x.detach().cpu().double().requires_grad_()
    f64 = [f.detach().cpu().double().requires_grad_() for f in factors]
    y64 = reference_forward(copy.deepcopy(p).to("cpu"), f64, x64)  # buffers (supports, channels) on the CPU
    y64.backward(grad.cpu().double())
    assert (y.cpu().double() - y64).abs().max().item() <= 3e-2 * y64.abs().max().item(), name
    for got, want, what in [(x.grad, x64.grad, "dX"), *[(f.grad, w.grad, n) for f, w, n in zip(factors, f64, p.factor_names)]]:
        err = (got.cpu().double() - want).norm() / want.norm()
        assert err <= 3e-2, f"{name}: {what} relative error {err:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_layer_matches_float64_math(name):
    """Forward and input/factor gradients of a bf16 CUDA layer against the published formula in float64."""
    layer, p, factors = structured_cuda_layer(name, torch.bfloat16)
    x = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    y.backward(grad)
    assert_matches_float64(name, p, factors, x, y, grad)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_autocast_layer_matches_float64_math(name):
    """Float32 factors under torch.autocast (Trainer's bf16=True): the product in bf16, the gradients in
    float32, against the published formula in float64."""
    layer, p, factors = structured_cuda_layer(name, torch.float32)
    x = torch.randn(512, 384, device="cuda", requires_grad=True)
    grad = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(grad)
    assert y.dtype == torch.bfloat16 and all(f.grad.dtype == torch.float32 for f in factors), name
    assert_matches_float64(name, p, factors, x, y, grad)


def test_the_ledger_matches_the_cuda_allocator():
    """lsparam.memory.measure on CUDA reads the allocator: its peak equals max_memory_allocated's."""
    from lsparam.memory import measure

    layer = torch.nn.Linear(1024, 1024, device="cuda")
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)

    def step():
        layer(x).sum().backward()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    expected = torch.cuda.max_memory_allocated() - base
    layer.zero_grad(set_to_none=True)
    x.grad = None
    measured = measure(step, device="cuda").peak
    assert abs(measured - expected) <= 0.05 * expected, (measured, expected)


@pytest.mark.parametrize("method, extra", [("sltrain", ["--state-bits", "8", "--per-layer"]),
                                           ("lost", ["--parallel", "fsdp"])])
def test_the_recipe_trains_in_bf16_on_cuda(method, extra, corpus, tmp_path):
    out = tmp_path / method
    args = common(corpus, out, "--method", method, "--steps", "6", "--save-every", "3", "--device", "cuda",
                  "--precision", "bf16", *extra)
    result = run_script(args, torchrun_procs=1 if "fsdp" in extra else None)
    assert result.returncode == 0, result.stderr[-3000:]
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["mem_mib"] > 0 for r in train)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_ppl"] < summary["initial_val_ppl"]
