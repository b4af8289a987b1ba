"""Pretrain a LLaMA with low-rank plus sparse weights (SLTrain, LOST), or a baseline, in one file.

    python recipes/pretrain.py                                   # llama_9m, LOST, offline corpus, CPU, ~2-3 min
    python recipes/pretrain.py --model llama_60m --method lost --tokens 1.1B --dataset c4
    torchrun --nproc_per_node 8 recipes/pretrain.py --model llama_1b --method sltrain --parallel fsdp --dataset c4

The model is ``LlamaForCausalLM(config)`` from ``recipes/configs/<model>.json`` (or a path to a config
JSON) with ``vocab_size`` taken from the tokenizer; ``--method`` turns its decoder's linear layers into
structured weights with ``lsparam.parametrize`` and the papers' per-size defaults
(``lsparam.presets.method_config``); every knob has a flag. The optimizer is AdamW inside
``lsparam.optim.LeanOptimizer`` (or GaLore's AdamW for ``--method galore``); the schedule is linear warmup
then cosine to ``--min-lr-ratio`` of the peak. Everything a run writes goes to ``--out``:
``metrics.jsonl``, ``summary.json``, ``loss.png`` and ``checkpoints/step_*``. docs/recipes.md has every
flag, the paper-reproduction commands, and how resume, export and torchrun work.

Choices (docs/recipes.md says why): ``--precision bf16`` means bf16 weights and AdamW states, not autocast;
a checkpoint is a directory written under a temporary name and ``os.replace``d into place (weights in
safetensors, gathered to rank 0 under FSDP; one ``weights_only`` torch file per rank); ``--export`` merges
into dense ``nn.Linear`` layers, saves GaLore/full models as they are, and refuses SiLU-LOST.

Raises:
    SystemExit (exit status 2, message on stderr) for invalid flags, among them:
        - ``--model`` neither a name in recipes/configs nor a readable LlamaConfig JSON file;
        - ``--tokens`` and ``--steps`` both given, or a budget that is not a positive size (50M, 1.5B, 200k);
        - ``--batch-size``, ``--seq-len``, ``--accumulation-steps``, ``--threads`` < 1; ``--lr`` <= 0;
          ``--warmup`` outside [0, 1); ``--min-lr-ratio`` outside [0, 1]; negative ``--eval-every``,
          ``--save-every``, ``--clip-norm``, ``--weight-decay``;
        - a method knob the method does not have (``--density`` with ``--method lost``) or an invalid value;
        - ``--per-layer`` with ``--parallel ddp|fsdp`` (the updates would race DDP's allreduce / FSDP's
          reduce-scatter); ``--state-bits 8|4`` with ``--parallel fsdp``; ``--method galore`` with fsdp,
          with ``--state-bits 8|4``, or without the ``galore-torch`` package;
        - ``--export`` with ``--method lost-silu`` (no dense form);
        - ``--parallel ddp|fsdp`` outside torchrun, or a torchrun launch with ``--parallel none``;
        - ``--resume PATH`` that is not a checkpoint, or a checkpoint made with incompatible settings;
        - data errors from recipes/data.py (``--dataset c4`` offline, missing files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lsparam.presets import DEFAULT_LR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `recipes.data`, `recipes.plot` from a source checkout
CONFIGS = Path(__file__).resolve().parent / "configs"
METHODS = ("full", "lowrank", "sltrain", "lost", "lost-silu", "galore")
KNOBS = {  # flag dest -> (config field, methods that have it)
    "rank": ("rank", ("lowrank", "sltrain", "lost", "lost-silu", "galore")),
    "density": ("density", ("sltrain",)),
    "alpha": ("alpha", ("sltrain",)),
    "seed_support": ("seed", ("sltrain",)),
    "sparse_backend": ("sparse_backend", ("sltrain",)),
    "channel_ratio": ("channel_ratio", ("lost", "lost-silu")),
    "gamma": ("gamma", ("lost", "lost-silu")),
    "sparse_init": ("sparse_init", ("lost", "lost-silu")),
    "residual_window": ("residual_window", ("lost", "lost-silu")),
    "galore_scale": ("scale", ("galore",)),
    "update_proj_gap": ("update_proj_gap", ("galore",)),
}
# A checkpoint resumes only under the settings it was made with (the schedule, eval and save may change).
MUST_MATCH = ("model", "method", *KNOBS, "precision", "batch_size", "seq_len", "accumulation_steps", "per_layer",
              "state_bits", "dataset", "data_files", "valid_files", "tokenizer", "vocab_size", "seed", "parallel")
DEFAULT_STEPS = 300  # the offline CPU run when neither --steps nor --tokens is given


class RecipeError(ValueError):
    """An invalid flag or combination of flags; printed as ``error: ...`` with exit status 2."""


# ---- flags -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"50M"`` -> 50_000_000; accepts k, M, B (or G), T suffixes and plain integers."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected a token count like 200k, 50M or 1.5B; got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def parse_rank(text: str) -> int | float:
    """An int (absolute rank) or a float in (0, 1) (fraction of each layer's smaller side)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int rank or a fraction in (0, 1); got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__.split("\n\n")[0],
                                epilog="docs/recipes.md explains every flag.")
    a = p.add_argument_group("model and method")
    a.add_argument("--model", default="llama_9m", help="a name in recipes/configs (llama_9m ... llama_7b) or a config JSON path")
    a.add_argument("--method", choices=METHODS, default="lost-silu",
                   help="weight structure (default: %(default)s, lsparam.parametrize's default: docs/methods.md#defaults)")
    a.add_argument("--rank", type=parse_rank, help="rank r (int) or fraction of min(in, out); default: paper per size, else hidden/4")
    a.add_argument("--density", type=float, help="SLTrain: fraction of entries in the sparse part (default 0.03; 0.05 at 7B)")
    a.add_argument("--alpha", type=float, help="SLTrain: low-rank scale alpha (product scaled by alpha/r; paper per size)")
    a.add_argument("--seed-support", type=int, help="SLTrain: seed of the random sparse support (default 0)")
    a.add_argument("--sparse-backend", choices=("auto", "csr", "scatter", "semi-structured"), help="SLTrain sparse matmul path")
    a.add_argument("--channel-ratio", type=float, help="LOST: fraction of input channels in the sparse part (default 0.05)")
    a.add_argument("--gamma", type=float, help="LOST: weight of the low-rank path (default 0.5)")
    a.add_argument("--sparse-init", choices=("original", "residual"), help="LOST: W_s from W0 (default) or the residual")
    a.add_argument("--residual-window", type=int, help="LOST: score channels on components r..r+k-1 only")
    a.add_argument("--galore-scale", type=float, help="GaLore: update scale (default 0.25)")
    a.add_argument("--update-proj-gap", type=int, help="GaLore: steps between projection updates (default 200)")
    a = p.add_argument_group("optimizer")
    a.add_argument("--lr", type=float, help="peak learning rate (default: full 1e-3, galore 1e-2, others 3e-3)")
    a.add_argument("--linear-lr-scale", type=float, default=1.0,
                   help="learning rate of the decoder layers' linear weights (dense or lsparam factors) as a multiple "
                        "of --lr; embeddings, head and norms keep --lr (default: %(default)s)")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0, as the papers)")
    a.add_argument("--state-bits", type=int, choices=(32, 8, 4), default=32, help="optimizer state bits (torchao for 8/4)")
    a.add_argument("--per-layer", action="store_true", help="update each parameter inside backward (single process only)")
    a.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    a.add_argument("--clip-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default: %(default)s)")
    a.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    a.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup (default: %(default)s)")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of init, data order and RNG (default: %(default)s)")
    a = p.add_argument_group("budget and data")
    a.add_argument("--tokens", type=parse_size, help="training tokens (50M, 1.5B, 200k); sets the number of steps")
    a.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS} when --tokens is not given)")
    a.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank (default: %(default)s)")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    a.add_argument("--dataset", help="a dataset name for recipes/data.py, e.g. c4 (default: the offline corpus)")
    a.add_argument("--data-files", help="local training text files (glob)")
    a.add_argument("--valid-files", help="local validation text files (glob)")
    a.add_argument("--tokenizer", help="tokenizer name or path (default: one trained on the training data)")
    a.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer (default: %(default)s)")
    a.add_argument("--valid-tokens", type=parse_size, default=65536, help="validation tokens (default: %(default)s)")
    a.add_argument("--cache-dir", default="runs/cache", help="tokenizer and token cache (default: %(default)s)")
    a = p.add_argument_group("run")
    a.add_argument("--out", help="run directory (default: runs/<model>-<method>)")
    a.add_argument("--eval-every", type=int, default=100, help="validate every N steps; 0: only at start and end")
    a.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all of --valid-tokens)")
    a.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps; 0: only at the end")
    a.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (default: %(default)s)")
    a.add_argument("--resume", help="'auto' (newest checkpoint in --out, if any) or a checkpoint directory")
    a.add_argument("--export", metavar="DIR", help="at the end, save a merged dense model + tokenizer (save_pretrained)")
    a.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none", help="multi-process mode under torchrun")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    a.add_argument("--threads", type=int, help="CPU threads per process (default: usable cores / local processes)")
    a.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    a.add_argument("--no-deterministic", action="store_true", help="allow nondeterministic kernels (faster on GPU)")
    a.add_argument("--kill-after-step", type=int, help=argparse.SUPPRESS)  # test hook: SIGKILL itself after step N (and its checkpoint, if due)
    return p


def find_config(model: str) -> Path:
    named = CONFIGS / f"{model}.json"
    if named.is_file():
        return named
    if model.endswith(".json") and Path(model).is_file():
        return Path(model)
    known = sorted(p.stem for p in CONFIGS.glob("*.json"))
    raise RecipeError(f"--model {model!r} is neither a name in recipes/configs ({', '.join(known)}) nor a config JSON file")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and fill the defaults that depend on others; raises RecipeError."""
    args.config_path = str(find_config(args.model))
    if args.tokens is not None and args.steps is not None:
        raise RecipeError(f"give --tokens or --steps, not both (got --tokens {args.tokens} --steps {args.steps})")
    if args.tokens is not None and args.tokens < 1:
        raise RecipeError(f"--tokens must be positive; got {args.tokens}")
    positive = ("batch_size", "seq_len", "accumulation_steps", "keep", "vocab_size", "valid_tokens")
    for name in positive + (("threads",) if args.threads is not None else ()) + (("eval_batches",) if args.eval_batches is not None else ()):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.seq_len < 2:
        raise RecipeError(f"--seq-len must be >= 2 (the model predicts token t+1 from tokens <= t); got {args.seq_len}")
    for name in ("steps", "eval_every", "save_every", "clip_norm", "weight_decay"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 0; got {value}")
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise RecipeError(f"--lr must be a positive number; got {args.lr}")
    if not (args.linear_lr_scale > 0 and math.isfinite(args.linear_lr_scale)):
        raise RecipeError(f"--linear-lr-scale must be a positive number; got {args.linear_lr_scale}")
    if not 0 <= args.warmup < 1:
        raise RecipeError(f"--warmup is a fraction of the steps in [0, 1); got {args.warmup}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise RecipeError(f"--min-lr-ratio must lie in [0, 1]; got {args.min_lr_ratio}")
    for dest, (_, methods) in KNOBS.items():
        if getattr(args, dest) is not None and args.method not in methods:
            flag = "--" + dest.replace("_", "-")
            raise RecipeError(f"{flag} applies to --method {' / '.join(methods)}, not --method {args.method}")
    if args.dataset and args.data_files:
        raise RecipeError("--dataset and --data-files are alternatives: give one (or neither for the offline corpus)")
    if args.per_layer and args.parallel != "none":
        raise RecipeError(f"--per-layer updates run inside backward and would race --parallel {args.parallel}'s gradient "
                          f"reduction; use --per-layer on a single process, or drop it")
    if args.parallel == "fsdp" and args.state_bits != 32:
        raise RecipeError("--state-bits 8/4 is not supported with --parallel fsdp (low-bit states on sharded DTensor "
                          "parameters); use --state-bits 32 with fsdp, or --parallel ddp")
    if args.method == "galore":
        if args.parallel == "fsdp":
            raise RecipeError("--method galore does not work with --parallel fsdp (its SVD needs whole gradients); use ddp")
        if args.state_bits != 32:
            raise RecipeError("--method galore supports --state-bits 32 only (GaLore's own 8-bit AdamW needs bitsandbytes on CUDA)")
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            raise RecipeError("--method galore needs the galore-torch package: pip install galore-torch") from None
    exporting_a_checkpoint = args.export and args.steps == 0 and args.resume not in (None, "auto")
    if args.export and args.method == "lost-silu" and not exporting_a_checkpoint:  # there, the checkpoint's method decides
        raise RecipeError("--export refused: --method lost-silu has no dense form (y = γ·SiLU(x Aᵀ) Bᵀ + ... is not "
                          "x Wᵀ for any W); use --method lost (linear LOST merges exactly) or drop --export")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda but torch.cuda.is_available() is False")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.precision = ("bf16" if args.device == "cuda" else "fp32") if args.precision == "auto" else args.precision
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel == "none" and world > 1:
        raise RecipeError(f"launched by torchrun with WORLD_SIZE={world} but --parallel none; pass --parallel ddp or fsdp")
    if args.parallel != "none" and "RANK" not in os.environ:
        raise RecipeError(f"--parallel {args.parallel} needs torchrun (RANK, WORLD_SIZE, LOCAL_RANK unset): "
                          f"torchrun --nproc_per_node N recipes/pretrain.py ...")
    if args.resume not in (None, "auto") and not (Path(args.resume) / "model.safetensors").is_file():
        raise RecipeError(f"--resume {args.resume!r} is not a checkpoint directory (no model.safetensors in it); "
                          f"use --resume auto for the newest one in --out")
    from transformers import LlamaConfig

    try:
        config = LlamaConfig.from_json_file(args.config_path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"--model {args.model!r}: not a LlamaConfig JSON ({error})") from None
    args.hidden_size = config.hidden_size
    method_settings(args, model_size_name(config))  # a bad knob value fails here, before any data is read
    args.out = args.out or f"runs/{Path(args.model).stem}-{args.method}"
    return args


# ---- setup -----------------------------------------------------------------------------------------
def model_size_name(config) -> str | None:
    """The lsparam.presets size whose shape this config has (for the papers' per-size defaults), else None."""
    from lsparam.presets import size_of

    return size_of(config)


def method_settings(args, size: str | None):
    """The lsparam config (or GaLore's settings dict) for --method at this size, with flag overrides."""
    from lsparam.presets import method_config

    overrides = {KNOBS[d][0]: getattr(args, d) for d in KNOBS if getattr(args, d) is not None}
    if args.method == "full":
        return None
    if args.method == "galore":  # GaLore's paper ranks equal SLTrain's; hidden/4 for the CPU sizes
        settings = {"rank": method_config("lowrank", size).rank, "scale": 0.25, "update_proj_gap": 200, "proj_type": "std"}
        if isinstance(settings["rank"], float):
            settings["rank"] = max(1, int(settings["rank"] * args.hidden_size))
        return {**settings, **overrides}
    try:
        return dataclasses.replace(method_config(args.method, size), **overrides)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"--method {args.method}: {error}") from None


def build_model(args, config, settings, device):
    """LlamaForCausalLM(config) seeded by --seed, parametrized by ``settings``, in the run's dtype."""
    from transformers import LlamaForCausalLM

    import lsparam

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if settings is not None and args.method != "galore":
        try:
            lsparam.parametrize(model, settings, progress=False)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"--method {args.method} on {args.model}: {error}") from None
    return model.to(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)


def build_optimizer(args, model, settings):
    from lsparam.optim import LeanOptimizer
    from lsparam.optim.lean import param_groups_by_role

    groups, optimizer_cls = param_groups_by_role(model, args.weight_decay), torch.optim.AdamW
    if args.method == "galore":  # GaLore projects the gradients of the decoder's 2-D linear weights
        from galore_torch import GaLoreAdamW

        warnings.filterwarnings("ignore", message="This implementation of AdamW is deprecated")
        projected = {id(m.weight) for m in decoder_linears(model)}
        decay = groups[0]["params"]
        groups = [{"params": [p for p in decay if id(p) in projected], "weight_decay": args.weight_decay, **settings},
                  {"params": [p for p in decay if id(p) not in projected], "weight_decay": args.weight_decay}] + groups[1:]
        optimizer_cls = GaLoreAdamW
    if args.linear_lr_scale != 1:
        groups = scale_linear_lr(groups, model, args.lr * args.linear_lr_scale)
    return LeanOptimizer(groups, optimizer_cls, lr=args.lr, weight_decay=args.weight_decay, per_layer=args.per_layer,
                         state_bits=args.state_bits, accumulation_steps=args.accumulation_steps,
                         clip_norm=args.clip_norm or None)


def decoder_linears(model) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` modules of the decoder layers (attention and MLP projections, not the head)."""
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]


def scale_linear_lr(groups: list[dict], model, lr: float) -> list[dict]:
    """Each group split in two: the parameters of the decoder layers' ``nn.Linear`` modules (their dense
    weights, or their lsparam factors) at ``lr``, the rest (embeddings, head, norms) as they were."""
    linear = {id(p) for m in decoder_linears(model) for p in m.parameters()}
    split = []
    for group in groups:
        inside = [p for p in group["params"] if id(p) in linear]
        outside = [p for p in group["params"] if id(p) not in linear]
        split += [{**group, "params": inside, "lr": lr}] if inside else []
        split += [{**group, "params": outside}] if outside else []
    return split


def lr_lambda(args, total_steps: int):
    """Linear warmup over --warmup of the steps, then cosine to --min-lr-ratio of the peak."""
    warmup = int(args.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def setup(args) -> dict:
    """Distributed init, threads, determinism, data, model, optimizer, schedule. Returns the run state."""
    from transformers import LlamaConfig

    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    if args.device == "cpu":  # one fixed thread count: no oversubscription, same kernels on every run
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.threads = args.threads or max(1, len(os.sched_getaffinity(0)) // local_world)
        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    if not args.no_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.parallel != "none":
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                device_id=device if args.device == "cuda" else None)
    random.seed(args.seed)
    np.random.seed(args.seed)

    from recipes.data import DataConfig, HubUnreachableError, build_data

    try:
        data = build_data(DataConfig(
            dataset=args.dataset, data_files=args.data_files, valid_files=args.valid_files, tokenizer=args.tokenizer,
            vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, rank=rank,
            world_size=world, cache_dir=args.cache_dir, valid_tokens=args.valid_tokens))
    except (ValueError, FileNotFoundError, HubUnreachableError) as error:
        raise RecipeError(f"data: {error}") from None
    if rank == 0:
        print(f"data: {data.description}")

    config = LlamaConfig.from_json_file(args.config_path)
    config.vocab_size = data.vocab_size
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(data.tokenizer, name, None))
    settings = method_settings(args, model_size_name(config))
    model = build_model(args, config, settings, device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    raw = model
    if args.parallel == "ddp":  # lsparam's buffers (specs, channel lists) are static: no broadcast needed
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[local_rank] if args.device == "cuda" else None, broadcast_buffers=False)
    elif args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in raw.model.layers:
            fully_shard(layer)
        fully_shard(raw)
    state = dict(args=args, rank=rank, world=world, device=device, data=data, config=config, settings=settings,
                 model=model, raw=raw, step=0)
    checkpoint = find_checkpoint(args)
    if checkpoint is not None:
        load_weights(state, checkpoint)
    state["optimizer"] = build_optimizer(args, raw, settings)
    state["tokens_per_step"] = args.batch_size * args.seq_len * args.accumulation_steps * world
    steps = args.steps if args.tokens is None else math.ceil(args.tokens / state["tokens_per_step"])
    state["total_steps"] = DEFAULT_STEPS if steps is None else steps
    state["scheduler"] = torch.optim.lr_scheduler.LambdaLR(state["optimizer"], lr_lambda(args, state["total_steps"]))
    if checkpoint is not None:
        load_training_state(state, checkpoint)
    return state


# ---- checkpoints -----------------------------------------------------------------------------------
def full_state_dict(state) -> dict | None:
    """The parametrized model's whole state_dict on CPU (rank 0; None elsewhere). Collective under FSDP."""
    if state["args"].parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(state["raw"], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return weights if state["rank"] == 0 else None
    return {k: v.detach().cpu() for k, v in state["raw"].state_dict().items()} if state["rank"] == 0 else None


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np_state,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in saved["python"]))
    np_state = dict(saved["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _plain_optimizer_state(value, to_plain: bool):
    """GaLore keeps a projector object in its state, which weights_only loads refuse: store its fields."""
    if isinstance(value, dict):
        if not to_plain and "galore_projector" in value:
            from galore_torch.galore_projector import GaLoreProjector

            projector = GaLoreProjector.__new__(GaLoreProjector)
            projector.__dict__.update(value["galore_projector"])
            return projector
        return {k: _plain_optimizer_state(v, to_plain) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_optimizer_state(v, to_plain) for v in value]
    if to_plain and type(value).__name__ == "GaLoreProjector":
        return {"galore_projector": dict(vars(value))}
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state) -> None:
    """Write checkpoints/step_N atomically: a temporary directory, fsynced, then os.replace."""
    from safetensors.torch import save_file

    args, rank, step = state["args"], state["rank"], state["step"]
    root = Path(args.out) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if final.exists():  # complete by construction (renamed into place only when whole)
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(state)
    weights = full_state_dict(state)
    if rank == 0:
        metadata = {"step": str(step), "args": json.dumps(vars(args)), "config": state["config"].to_json_string()}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata=metadata)
        state["data"].tokenizer.save_pretrained(str(tmp / "tokenizer"))
    sharded = args.parallel == "fsdp"
    optimizer = _plain_optimizer_state(state["optimizer"].state_dict(), True) if (sharded or rank == 0) else None
    torch.save({"step": step, "args": vars(args), "world_size": state["world"], "optimizer": optimizer,
                "scheduler": state["scheduler"].state_dict(), "rng": rng_state(),
                "data": state["data"].train.state_dict()}, tmp / f"state_rank{rank}.pt")
    _barrier(state)
    if rank == 0:
        for file in (f for f in tmp.rglob("*") if f.is_file()):
            _fsync(file)
        os.replace(tmp, final)
        _fsync(root)
        for old in sorted(root.glob("step_*"))[: -args.keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(state)


def find_checkpoint(args) -> Path | None:
    """The checkpoint --resume names: 'auto' gives the newest complete one in --out (or None)."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        found = sorted((Path(args.out) / "checkpoints").glob("step_*"))
        return found[-1] if found else None
    return Path(args.resume)


def load_weights(state, path: Path) -> None:
    from safetensors.torch import load_file

    args = state["args"]
    sharded = args.parallel == "fsdp"  # a rank's own shard returns to its own device; the rest to CPU first
    saved = torch.load(path / f"state_rank{state['rank']}.pt", weights_only=True, map_location=None if sharded else "cpu")
    different = {k: (saved["args"].get(k), getattr(args, k)) for k in MUST_MATCH if saved["args"].get(k) != getattr(args, k)}
    if saved["world_size"] != state["world"]:
        different["world_size"] = (saved["world_size"], state["world"])
    if different:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in different.items())
        raise RecipeError(f"checkpoint {str(path)!r} was made with other settings ({listed})")
    weights = load_file(str(path / "model.safetensors"))
    if args.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(state["raw"], weights, options=StateDictOptions(full_state_dict=True))
    else:
        state["raw"].load_state_dict(weights)
    state["saved"] = saved


def load_training_state(state, path: Path) -> None:
    saved = state.pop("saved")
    optimizer = saved["optimizer"]
    if optimizer is None:  # not sharded: rank 0's file holds it
        optimizer = torch.load(path / "state_rank0.pt", weights_only=True, map_location="cpu")["optimizer"]
    state["optimizer"].load_state_dict(_plain_optimizer_state(optimizer, False))
    state["scheduler"].load_state_dict(saved["scheduler"])
    state["data"].train.load_state_dict(saved["data"])
    set_rng_state(saved["rng"])
    state["step"] = saved["step"]
    if state["rank"] == 0:
        print(f"resumed from {path} at step {saved['step']}")


def model_from_checkpoint(path, device="cpu"):
    """The parametrized model of a checkpoint directory, rebuilt from the settings stored with its weights.

    >>> model = model_from_checkpoint("runs/llama_9m-lost/checkpoints/step_00000300")  # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    args = argparse.Namespace(**json.loads(metadata["args"]))
    config = LlamaConfig.from_dict(json.loads(metadata["config"]))
    model = build_model(args, config, method_settings(args, model_size_name(config)), device)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors"), device=str(device)))
    return model


def export_checkpoint(path, directory: str) -> None:
    """A checkpoint as a plain dense LlamaForCausalLM + tokenizer (``save_pretrained``, safetensors), which
    vanilla ``AutoModelForCausalLM.from_pretrained`` loads. Refuses SiLU-LOST (no dense form)."""
    import lsparam
    from transformers import AutoTokenizer

    model = model_from_checkpoint(path)
    try:
        lsparam.merge(model)  # every structured layer becomes a plain dense nn.Linear
    except lsparam.NoDenseFormError as error:
        raise RecipeError(f"--export refused: {error}") from None
    model.config.use_cache = True
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(Path(path) / "tokenizer")).save_pretrained(directory)
    print(f"exported {path} as a dense LlamaForCausalLM to {directory}")


# ---- training --------------------------------------------------------------------------------------
def _barrier(state) -> None:
    if state["world"] > 1:
        dist.barrier()


def _mean_across_ranks(state, value: torch.Tensor) -> float:
    if state["world"] > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= state["world"]
    return value.item()


def peak_memory_mib(device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set size (includes the libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(state) -> float:
    """Mean token loss over the validation batches (every rank the same number of batches)."""
    model = state["model"] if state["args"].parallel == "fsdp" else state["raw"]
    batches = state.setdefault("valid", state["data"].valid_batches(state["args"].eval_batches))
    count = torch.tensor(len(batches), device=state["device"])  # on the device: NCCL reduces CUDA tensors only
    if state["world"] > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=state["device"])
    for x in batches[: int(count)]:
        x = x.to(state["device"])
        total += model(input_ids=x, labels=x, use_cache=False).loss.double()
    model.train()
    return _mean_across_ranks(state, total / max(1, int(count)))


def log(state, record: dict) -> None:
    if state["rank"] == 0:
        with open(Path(state["args"].out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def log_eval(state) -> float:
    loss = evaluate(state)
    log(state, {"type": "eval", "step": state["step"], "tokens": state["step"] * state["tokens_per_step"],
                "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    return loss


def train(state) -> dict:
    from tqdm import tqdm

    args, model, optimizer, scheduler = state["args"], state["model"], state["optimizer"], state["scheduler"]
    total, rank, start = state["total_steps"], state["rank"], state["step"]
    metrics = Path(args.out) / "metrics.jsonl"
    kept = []  # a resumed run keeps the records up to its checkpoint, dropping what a killed run logged after it
    if rank == 0 and start > 0 and metrics.exists():
        kept = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] <= start]
    if rank == 0:
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
    first = [r["val_loss"] for r in kept if r["type"] == "eval" and r["step"] == 0]
    first_loss = log_eval(state) if start == 0 else (first[0] if first else None)
    batches = iter(state["data"].train)
    if rank == 0:
        params = sum(p.numel() for p in state["raw"].parameters())
        print(f"{Path(args.model).stem} {args.method}: {params:,} parameters; {total} steps of {state['tokens_per_step']:,} "
              f"tokens ({total * state['tokens_per_step']:,} in all), peak lr {args.lr:g}, {args.precision}, "
              f"{state['world']} process(es), {args.threads or 'default'} thread(s) each")
    bar = tqdm(total=total, initial=start, desc=f"{Path(args.model).stem} {args.method}", disable=rank != 0, dynamic_ncols=True)
    seconds, tokens_here = 0.0, 0  # time spent in training steps (not evaluation or checkpoints)
    while state["step"] < total:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=state["device"])
        for micro in range(args.accumulation_steps):
            x = next(batches).to(state["device"])
            last = micro == args.accumulation_steps - 1
            with model.no_sync() if args.parallel == "ddp" and not last else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
            grad_norm = None
            if last and not args.per_layer:
                grads = [p.grad for p in state["raw"].parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) / args.accumulation_steps
                grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            optimizer.step()
            optimizer.zero_grad()
            loss_sum += loss.detach().float()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["step"] += 1
        tokens_here += state["tokens_per_step"]
        loss_value = _mean_across_ranks(state, loss_sum / args.accumulation_steps)
        seconds += time.perf_counter() - started
        memory = peak_memory_mib(state["device"])
        log(state, {"type": "train", "step": state["step"], "tokens": state["step"] * state["tokens_per_step"],
                    "loss": loss_value, "lr": float(lr), "grad_norm": grad_norm, "tok_per_s": tokens_here / seconds,
                    "mem_mib": memory, "time": seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_here / seconds:,.0f}", lr=f"{float(lr):.1e}",
                        mem=f"{memory:,.0f}MiB", refresh=False)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {state['step']}: lower --lr or keep --clip-norm")
        if args.eval_every and state["step"] % args.eval_every == 0 and state["step"] < total:
            log_eval(state)
        if args.save_every and state["step"] % args.save_every == 0:
            save_checkpoint(state)
        if args.kill_after_step == state["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    final_loss = log_eval(state)
    save_checkpoint(state)
    return {"first_loss": first_loss, "final_loss": final_loss, "train_seconds": seconds,
            "tokens_per_s": tokens_here / seconds if tokens_here else None}


def parameters_by_kind(model) -> dict:
    """Parameter counts: embedding, head, norms, dense linear weights, low-rank factors, sparse parts."""
    import lsparam

    kinds = dict.fromkeys(("embedding", "lm_head", "norm", "dense_linear", "lowrank_factors", "sparse"), 0)
    structured = {}
    for layer, parametrization in lsparam.structured_layers(model).values():
        for i, name in enumerate(parametrization.factor_names):
            factor = getattr(layer.parametrizations.weight, f"original{i}")
            structured[id(factor)] = "lowrank_factors" if name in ("A", "B") else "sparse"
    for name, p in model.named_parameters():
        kind = structured.get(id(p)) or ("embedding" if "embed" in name else "lm_head" if "lm_head" in name
                                         else "norm" if "norm" in name else "dense_linear")
        kinds[kind] += p.numel()
    return {"total": sum(kinds.values()), **kinds}


def summarize(state, result: dict) -> dict:
    import lsparam

    args, raw = state["args"], state["raw"]
    summary = {
        "model": Path(args.model).stem, "method": args.method, "settings": repr(state["settings"]),
        "steps": state["step"], "tokens": state["step"] * state["tokens_per_step"], "world_size": state["world"],
        "precision": args.precision, "device": str(state["device"]),
        "initial_val_ppl": None if result["first_loss"] is None else math.exp(result["first_loss"]),
        "final_val_loss": result["final_loss"], "final_val_ppl": math.exp(min(result["final_loss"], 50)),
        "parameters": parameters_by_kind(raw),  # DTensor numel() is the global size under FSDP
        "peak_memory_mib": peak_memory_mib(state["device"]),
        "memory_kind": "cuda max_memory_allocated" if state["device"].type == "cuda" else "cpu peak RSS (whole process)",
        "tokens_per_s": result["tokens_per_s"], "train_seconds": result["train_seconds"],
    }
    if state["rank"] == 0:
        if lsparam.structured_layers(raw):
            print(lsparam.summary(raw))
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        from recipes.plot import plot_runs

        plot_runs([args.out], Path(args.out) / "loss.png", title=f"{summary['model']} {args.method}")
    return summary


def main(argv=None) -> dict | None:
    for noisy in ("torchao", "torch.utils._pytree", "bitsandbytes"):  # optional-kernel notices at import
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.export and args.steps == 0 and args.resume not in (None, "auto"):  # export a checkpoint, no run
            return export_checkpoint(args.resume, args.export)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        state = setup(args)
        result = train(state)
        summary = summarize(state, result)
        if args.export:  # from the final checkpoint, which train() has just written
            if state["rank"] == 0:
                export_checkpoint(Path(args.out) / "checkpoints" / f"step_{state['step']:08d}", args.export)
            _barrier(state)
        return summary
    except RecipeError as error:
        parser.error(str(error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
