"""The end of a run of ``recipes/pretrain.py``: ``summary.json``, the printed summary and ``loss.png``."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from recipes.pretrain import Run

def peak_memory_mib(device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set size (includes the libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


KINDS = ("embedding", "lm_head", "norm", "dense_linear", "lowrank_factors", "sparse", "other_factors")
_ROLE_KINDS = {"lowrank_out": "lowrank_factors", "lowrank_in": "lowrank_factors", "sparse": "sparse"}


def parameters_by_kind(model: nn.Module) -> dict:
    """Parameter counts by what they are, from declared roles and module types (not parameter names):
    lsparam factors by their role (``p.roles()``: low-rank, sparse, other), then the output head
    (``get_output_embeddings``), embeddings (``nn.Embedding``), dense linear weights (``nn.Linear``) and
    norms (every other module with parameters). A tied head counts once, as the embedding."""
    import lsparam

    by_id = {}
    for layer, parametrization in lsparam.structured_layers(model).values():
        for i, role in enumerate(parametrization.roles()):
            factor = getattr(layer.parametrizations.weight, f"original{i}")
            by_id[id(factor)] = _ROLE_KINDS.get(role, "other_factors")
    head = model.get_output_embeddings()
    kinds = dict.fromkeys(KINDS, 0)
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = by_id.get(id(p)) or ("embedding" if isinstance(module, nn.Embedding) and module is not head
                                        else "lm_head" if module is head
                                        else "dense_linear" if isinstance(module, nn.Linear) else "norm")
            kinds[kind] += p.numel()
    return {"total": sum(kinds.values()), **kinds}


def summarize(run: Run, result: dict) -> dict:
    import lsparam

    args, raw = run.args, run.raw
    summary = {
        "model": Path(args.model).stem, "method": args.method, "settings": repr(run.settings),
        "steps": run.step, "tokens": run.step * run.tokens_per_step, "world_size": run.world,
        "precision": args.precision, "device": str(run.device),
        "initial_val_ppl": None if result["first_loss"] is None else math.exp(result["first_loss"]),
        "final_val_loss": result["final_loss"], "final_val_ppl": math.exp(min(result["final_loss"], 50)),
        "parameters": parameters_by_kind(raw),  # DTensor numel() is the global size under FSDP
        "peak_memory_mib": peak_memory_mib(run.device),
        "memory_kind": "cuda max_memory_allocated" if run.device.type == "cuda" else "cpu peak RSS (whole process)",
        "tokens_per_s": result["tokens_per_s"], "train_seconds": result["train_seconds"],
    }
    if run.rank == 0:
        if lsparam.structured_layers(raw):
            print(lsparam.summary(raw))
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        from recipes.plot import plot_runs

        plot_runs([args.out], Path(args.out) / "loss.png", title=f"{summary['model']} {args.method}")
    return summary
