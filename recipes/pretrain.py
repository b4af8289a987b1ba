"""Pretrain a LLaMA with low-rank plus sparse weights (SLTrain, LOST), low-rank activations (CoLA), or a baseline.

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

The recipe's modules: ``recipes/flags.py`` (the flags and every cross-check), ``recipes/checkpoint.py``
(atomic save, resume), ``recipes/export.py`` (a checkpoint as a model, dense export), ``recipes/metrics.py``
(``metrics.jsonl``), ``recipes/summary.py`` (``summary.json`` and the loss plot), ``recipes/health.py``
(warnings of a run that does not learn), ``lsparam/lean_head.py`` (the chunked LM head and loss),
``recipes/distributed.py`` (the process group) and this one (setup, training, evaluation, ``main``).

Choices (docs/recipes.md says why): ``--precision bf16`` means bf16 weights and AdamW states, not autocast;
a checkpoint is a directory written under a temporary name and ``os.replace``d into place (weights in
safetensors, gathered to rank 0 under FSDP; one ``weights_only`` torch file per rank); ``--export`` merges
into dense ``nn.Linear`` layers, saves GaLore/full models as they are, and refuses SiLU-LOST.

Raises:
    SystemExit (exit status 2, message on stderr) for invalid flags (``recipes.flags.check_args`` lists
    them), a ``--resume`` checkpoint made with incompatible settings, and data errors from recipes/data
    (``--dataset c4`` offline, missing files).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # Bootstrap for `python recipes/pretrain.py` and `torchrun ... recipes/pretrain.py`: run as a file,
    # Python puts recipes/ (not the repository root) on sys.path, so `import recipes.flags` would fail.
    # Run this file again as the module recipes.pretrain, exactly as `python -m recipes.pretrain` does.
    import runpy
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    runpy.run_module("recipes.pretrain", run_name="__main__", alter_sys=True)
    sys.exit(0)

import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lsparam.presets import size_of
from recipes import checkpoint, distributed, metrics
from recipes.summary import peak_memory_mib, summarize
from recipes.checkpoint import WriteFailed
from recipes.export import export_checkpoint
from recipes.health import HealthWatch
from lsparam.lean_head import use_lean_head
from recipes.flags import DEFAULT_STEPS, RecipeError, build_parser, check_args, exporting_a_checkpoint, method_settings


@dataclass
class Run:
    """Everything a training run holds between setup and its summary."""

    args: Any  # the checked flags (argparse.Namespace)
    rank: int
    world: int
    device: torch.device
    data: Any  # recipes.data's Data: tokenizer, train stream, validation batches
    config: Any  # the model's LlamaConfig
    settings: Any  # the lsparam config, GaLore's settings dict, or None (full)
    model: nn.Module  # what the training step calls: DDP- or FSDP-wrapped under --parallel
    raw: nn.Module  # the LlamaForCausalLM itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    tokens_per_step: int
    step: int = 0
    valid: list | None = field(default=None, repr=False)  # the validation batches, read once


# ---- setup -----------------------------------------------------------------------------------------
def build_model(args, config, settings, device) -> nn.Module:
    """LlamaForCausalLM(config) seeded by --seed, parametrized by ``settings``, in the run's dtype."""
    from transformers import LlamaForCausalLM

    import lsparam

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if args.linear_init_std is not None:  # the decoder's scale alone (initializer_range would move the embeddings too)
        with torch.no_grad():
            for layer in decoder_linears(model):
                layer.weight.normal_(0.0, args.linear_init_std)
    if settings is not None and args.method != "galore":
        try:
            lsparam.parametrize(model, settings, progress=False)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"--method {args.method} on {args.model}: {error}") from None
    if args.lean_head:
        use_lean_head(model)
    return model.to(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)


def build_optimizer(args, model: nn.Module, settings):
    from lsparam.optim import LeanOptimizer
    from lsparam.optim.groups import param_groups_by_role

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


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of the model but its output head: a causal LM's attention and MLP
    projections (structured or dense), found by type and by ``get_output_embeddings``, not by name."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def scale_linear_lr(groups: list[dict], model: nn.Module, lr: float) -> list[dict]:
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


def _init_process(args) -> tuple[int, int, torch.device]:
    """Rank, world size and device; threads, determinism, the process group and the seeds."""
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
        distributed.init("nccl" if args.device == "cuda" else "gloo", device if args.device == "cuda" else None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return rank, world, device


def _build_data(args, rank: int, world: int):
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
    return data


def _wrap(args, raw: nn.Module, device: torch.device) -> nn.Module:
    """The model the training step calls: DDP or FSDP2 around ``raw`` under --parallel, else ``raw``."""
    if args.parallel == "ddp":  # lsparam's buffers (specs, channel lists) are static: no broadcast needed
        return nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if args.device == "cuda" else None,
                                                   broadcast_buffers=False)
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in raw.model.layers:
            fully_shard(layer)
        fully_shard(raw)
    return raw


def setup(args) -> Run:
    """Distributed init, threads, determinism, data, model, optimizer, schedule (and --resume). Returns the Run."""
    from transformers import LlamaConfig

    rank, world, device = _init_process(args)
    path = checkpoint.find_checkpoint(args)
    saved = None if path is None else checkpoint.read_training_state(path, args, rank, world)  # refuses before any work
    data = _build_data(args, rank, world)
    config = LlamaConfig.from_json_file(args.config_path)
    config.vocab_size = data.vocab_size
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(data.tokenizer, name, None))
    settings = method_settings(args, size_of(config))
    raw = build_model(args, config, settings, device)
    if args.grad_checkpointing:
        raw.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap(args, raw, device)
    if args.compile:  # the whole model is one graph (lsparam's weights trace without breaks)
        model = torch.compile(model)
    if path is not None:  # the weights before the optimizer is built over them
        checkpoint.load_weights(raw, path, args)
    optimizer = build_optimizer(args, raw, settings)
    tokens_per_step = args.batch_size * args.seq_len * args.accumulation_steps * world
    steps = args.steps if args.tokens is None else math.ceil(args.tokens / tokens_per_step)
    total_steps = DEFAULT_STEPS if steps is None else steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    run = Run(args=args, rank=rank, world=world, device=device, data=data, config=config, settings=settings,
              model=model, raw=raw, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
              tokens_per_step=tokens_per_step)
    if path is not None:
        changed = checkpoint.restore_training_state(run, saved, path)
        if changed:
            log(run, {"type": "resume", "step": run.step, "changed": changed})
    return run


# ---- training --------------------------------------------------------------------------------------
def _mean_across_ranks(run: Run, value: torch.Tensor) -> float:
    if run.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= run.world
    return value.item()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over the validation batches (every rank the same number of batches)."""
    model = run.model if run.args.parallel == "fsdp" else run.raw
    if run.valid is None:
        run.valid = run.data.valid_batches(run.args.eval_batches)
        asked = run.args.eval_batches
        if asked is not None and asked > len(run.valid) and run.rank == 0:
            print(f"note: --eval-batches {asked}, but --valid-tokens {run.args.valid_tokens:,} make "
                  f"{len(run.valid)} batches: evaluating on those", file=sys.stderr)
    count = torch.tensor(len(run.valid), device=run.device)  # on the device: NCCL reduces CUDA tensors only
    if run.world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for x in run.valid[: int(count)]:
        x = x.to(run.device)
        total += model(input_ids=x, labels=x, use_cache=False).loss.double()
    model.train()
    return _mean_across_ranks(run, total / max(1, int(count)))


def log(run: Run, record: dict) -> None:
    if run.rank == 0:
        metrics.append(Path(run.args.out), record)


def log_eval(run: Run) -> float:
    loss = evaluate(run)
    log(run, {"type": "eval", "step": run.step, "tokens": run.step * run.tokens_per_step,
              "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    return loss


def train(run: Run) -> dict:
    from tqdm import tqdm

    args, model, optimizer, scheduler, total = run.args, run.model, run.optimizer, run.scheduler, run.total_steps
    start = run.step
    kept = metrics.restart(Path(args.out), start) if run.rank == 0 else []
    first_loss = log_eval(run) if start == 0 else metrics.logged_eval(kept, 0)
    batches = iter(run.data.train)
    name = Path(args.model).stem
    if run.rank == 0:
        params = sum(p.numel() for p in run.raw.parameters())
        print(f"{name} {args.method}: {params:,} parameters; {total} steps of {run.tokens_per_step:,} "
              f"tokens ({total * run.tokens_per_step:,} in all), peak lr {args.lr:g}, {args.precision}, "
              f"{run.world} process(es), {args.threads or 'default'} thread(s) each")
    health = HealthWatch(run.config.vocab_size, int(args.warmup * total), args.lr)
    bar = tqdm(total=total, initial=run.step, desc=f"{name} {args.method}", disable=run.rank != 0, dynamic_ncols=True)
    seconds, tokens_here = 0.0, 0  # time spent in training steps (not evaluation or checkpoints)
    while run.step < total:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        for micro in range(args.accumulation_steps):
            x = next(batches).to(run.device)
            last = micro == args.accumulation_steps - 1
            with model.no_sync() if args.parallel == "ddp" and not last else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
            grad_norm = None
            if last and not args.per_layer:
                grads = [p.grad for p in run.raw.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) / args.accumulation_steps
                grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
                if not math.isfinite(grad_norm):  # one NaN entry, clipped globally, would reach every weight
                    raise FloatingPointError(checkpoint.non_finite_message(run, f"the gradient norm is {grad_norm}", run.step + 1))
            loss_sum += loss.detach().float()
            # once per step, before the update (earlier micro-batches only accumulate): one sync, not one each
            if last and not bool(torch.isfinite(loss_sum)):
                raise FloatingPointError(checkpoint.non_finite_message(run, f"the loss is {loss_sum.item()}", run.step + 1))
            optimizer.step()
            optimizer.zero_grad()
        # the rate this step used: --lr on the schedule (the embeddings' and head's; the decoder's linear
        # layers run at --linear-lr-scale times it), read as a number before the scheduler moves it (a
        # low-bit optimizer's rate is a tensor that scheduler.step() updates in place)
        lr = args.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler.step()
        run.step += 1
        tokens_here += run.tokens_per_step
        loss_value = _mean_across_ranks(run, loss_sum / args.accumulation_steps)
        seconds += time.perf_counter() - started
        memory = peak_memory_mib(run.device)
        log(run, {"type": "train", "step": run.step, "tokens": run.step * run.tokens_per_step,
                  "loss": loss_value, "lr": float(lr), "grad_norm": grad_norm, "tok_per_s": tokens_here / seconds,
                  "mem_mib": memory, "time": seconds})
        for warning in health.check(run.step, loss_value, grad_norm):
            log(run, {"type": "warning", "step": run.step, "message": warning})
            if run.rank == 0:
                tqdm.write(f"warning: {warning}", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_here / seconds:,.0f}", lr=f"{float(lr):.1e}",
                        mem=f"{memory:,.0f}MiB", refresh=False)
        if args.eval_every and run.step % args.eval_every == 0 and run.step < total:
            log_eval(run)
        if args.save_every and run.step % args.save_every == 0:
            checkpoint.save_checkpoint(run)
        if args.kill_after_step == run.step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if run.step == start and metrics.logged_eval(kept, start) is not None:  # a finished run resumed: logged already
        final_loss = evaluate(run)
    else:
        final_loss = log_eval(run)
    checkpoint.save_checkpoint(run)
    return {"first_loss": first_loss, "final_loss": final_loss, "train_seconds": seconds,
            "tokens_per_s": tokens_here / seconds if tokens_here else None}


def _writable_out(out: Path) -> None:
    """Create --out, and check that files can be written there, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks probe at the same time
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RecipeError(f"--out {str(out)!r} cannot be written to ({error.strerror or error})") from None


def main(argv=None) -> dict | None:
    for noisy in ("torchao", "torch.utils._pytree", "bitsandbytes"):  # optional-kernel notices at import
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if exporting_a_checkpoint(args):  # export a checkpoint, no run
            return export_checkpoint(args.resume, args.export)
        _writable_out(Path(args.out))
        run = setup(args)
        result = train(run)
        summary = summarize(run, result)
        if args.export:  # from the final checkpoint, which train() has just written
            if run.rank == 0:
                export_checkpoint(Path(args.out) / "checkpoints" / f"step_{run.step:08d}", args.export)
            checkpoint.barrier(run)
        return summary
    except RecipeError as error:
        parser.error(str(error))
    except (FloatingPointError, WriteFailed) as error:  # diverged, or disk full: the message says what to do
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as error:  # metrics.jsonl, summary.json, the plot: a file of the run could not be written
        print(f"{parser.prog}: error: {checkpoint.write_failure(error, error.filename or args.out)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        run = None  # noqa: F841  (the DDP model and its reducer go before the process group)
        distributed.shutdown()


if __name__ == "__main__":
    main()
