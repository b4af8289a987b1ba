"""The flags of ``recipes/pretrain.py``: the parser, its cross-checks and the method settings they give.

The choices come from the library: ``--method`` is :data:`lsparam.presets.METHODS` plus ``galore``,
``--sparse-backend`` is :data:`lsparam.config.SPARSE_BACKENDS`, ``--sparse-init`` is
:data:`lsparam.config.LOST_SPARSE_INITS`. :func:`check_args` validates a parsed namespace and fills the
defaults that depend on other flags; every refusal is a :class:`RecipeError`, which ``pretrain.main``
prints as ``error: ...`` with exit status 2.

>>> args = check_args(build_parser().parse_args(["--method", "sltrain", "--sparse-backend", "gather"]))
>>> method_settings(args, None).sparse_backend
'gather'
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
import re
from pathlib import Path

import torch

from lsparam.config import LOST_SPARSE_INITS, SPARSE_BACKENDS
from lsparam.presets import METHODS as LIBRARY_METHODS
from lsparam.presets import default_lr, size_of, training_defaults

CONFIGS = Path(__file__).resolve().parent / "configs"
METHODS = (*LIBRARY_METHODS, "galore")  # lsparam's methods, and GaLore's optimizer-side projection
KNOBS = {  # flag dest -> (config field, methods that have it)
    "rank": ("rank", ("lowrank", "sltrain", "lost", "lost-silu", "cola", "galore")),
    "density": ("density", ("sltrain",)),
    "alpha": ("alpha", ("sltrain",)),
    "seed_support": ("seed", ("sltrain",)),
    "sparse_backend": ("sparse_backend", ("sltrain",)),
    "channel_ratio": ("channel_ratio", ("lost", "lost-silu")),
    "gamma": ("gamma", ("lost", "lost-silu")),
    "sparse_init": ("sparse_init", ("lost", "lost-silu")),
    "residual_window": ("residual_window", ("lost", "lost-silu")),
    "activation": ("activation", ("cola",)),
    "cola_checkpoint": ("checkpoint", ("cola",)),
    "galore_scale": ("scale", ("galore",)),
    "update_proj_gap": ("update_proj_gap", ("galore",)),
}
# A checkpoint resumes only under the settings it was made with (the schedule, eval and save may change).
MUST_MATCH = ("model", "linear_init_std", "method", *KNOBS, "precision", "batch_size", "seq_len", "accumulation_steps", "per_layer",
              "state_bits", "dataset", "data_files", "valid_files", "tokenizer", "vocab_size", "valid_tokens", "seed",
              "parallel")
# Flags a resumed run may change: they take effect from the resumed step (recipes.checkpoint), and the
# change is printed and logged (threads and nondeterministic kernels end a bit-for-bit resume).
MAY_CHANGE = ("lr", "linear_lr_scale", "weight_decay", "clip_norm", "warmup", "min_lr_ratio", "eval_every", "eval_batches",
              "save_every", "keep", "lean_head", "compile", "threads", "no_deterministic")
DEFAULT_STEPS = 300  # the offline CPU run when neither --steps nor --tokens is given
DEFAULT_VOCAB = 8192  # a tokenizer trained on the data (recipes.data)
DESCRIPTION = "Pretrain a LLaMA with low-rank plus sparse weights (SLTrain, LOST), low-rank activations (CoLA), or a baseline."


class RecipeError(ValueError):
    """An invalid flag or combination of flags; printed as ``error: ...`` with exit status 2."""


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
    p = argparse.ArgumentParser(prog="pretrain.py", description=DESCRIPTION,
                                epilog="docs/recipes.md explains every flag.")
    a = p.add_argument_group("model and method")
    a.add_argument("--model", default="llama_9m", help="a name in recipes/configs (llama_9m ... llama_7b) or a config JSON path")
    a.add_argument("--linear-init-std", type=float,
                   help="std of the decoder's linear weights at init, re-drawn before the method is applied; the "
                        "embeddings and head keep the config's initializer_range (default: initializer_range for all)")
    a.add_argument("--method", choices=METHODS, default="lost-silu",
                   help="weight structure (default: %(default)s, lsparam.parametrize's default: docs/methods.md#defaults)")
    a.add_argument("--rank", type=parse_rank, help="rank r (int) or fraction of min(in, out); default: paper per size, else hidden/4")
    a.add_argument("--density", type=float, help="SLTrain: fraction of entries in the sparse part (default 0.03; 0.05 at 7B)")
    a.add_argument("--alpha", type=float, help="SLTrain: low-rank scale alpha (product scaled by alpha/r; paper per size)")
    a.add_argument("--seed-support", type=int, help="SLTrain: seed of the random sparse support (default 0)")
    a.add_argument("--sparse-backend", choices=SPARSE_BACKENDS, help="SLTrain sparse matmul path (default: auto)")
    a.add_argument("--channel-ratio", type=float, help="LOST: fraction of input channels in the sparse part (default 0.05)")
    a.add_argument("--gamma", type=float, help="LOST: weight of the low-rank path (default 0.5)")
    a.add_argument("--sparse-init", choices=LOST_SPARSE_INITS, help="LOST: W_s from W0 (default) or the residual")
    a.add_argument("--residual-window", type=int, help="LOST: score channels on components r..r+k-1 only")
    a.add_argument("--activation", choices=("silu", "gelu", "relu"), help="CoLA: the activation between the factors (default silu)")
    a.add_argument("--cola-checkpoint", action="store_true", default=None,
                   help="CoLA: recompute each layer's x Aᵀ in backward instead of saving it (less activation memory)")
    a.add_argument("--galore-scale", type=float, help="GaLore: update scale (default 0.25)")
    a.add_argument("--update-proj-gap", type=int, help="GaLore: steps between projection updates (default 200)")
    a = p.add_argument_group("optimizer")
    a.add_argument("--lr", type=float, help="peak learning rate (default: full 1e-3, galore 1e-2, cola 6e-3 to 1e-3 by "
                   "size as its paper, others 3e-3)")
    a.add_argument("--linear-lr-scale", type=float, default=1.0,
                   help="learning rate of the decoder layers' linear weights (dense or lsparam factors) as a multiple "
                        "of --lr; embeddings, head and norms keep --lr (default: %(default)s)")
    a.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0 as the SLTrain and GaLore papers; cola 0.01)")
    a.add_argument("--state-bits", type=int, choices=(32, 8, 4), default=32, help="optimizer state bits (torchao for 8/4)")
    a.add_argument("--per-layer", action="store_true", help="update each parameter inside backward (single process only)")
    a.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    a.add_argument("--clip-norm", type=float, help="gradient clipping norm; 0 disables (default: 1.0; cola 0.5)")
    a.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    a.add_argument("--warmup", type=float, help="fraction of steps of linear warmup (default: 0.1; cola at 60M 0.2)")
    a.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default: 0.1)")
    a.add_argument("--seed", type=int, default=0, help="seed of init, data order and RNG (default: %(default)s)")
    a = p.add_argument_group("budget and data")
    a.add_argument("--tokens", type=parse_size, help="training tokens (50M, 1.5B, 200k); sets the number of steps")
    a.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS} when --tokens is not given)")
    a.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank (default: %(default)s)")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    a.add_argument("--dataset", help="a dataset name for recipes/data, e.g. c4 (default: the offline corpus)")
    a.add_argument("--data-files", help="local training text files (glob)")
    a.add_argument("--valid-files", help="local validation text files (glob)")
    a.add_argument("--tokenizer", help="tokenizer name or path (default: one trained on the training data)")
    a.add_argument("--vocab-size", type=int, help=f"vocabulary of a tokenizer trained on the data (default: {DEFAULT_VOCAB}; "
                   "not with --tokenizer, whose vocabulary it is)")
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
    a.add_argument("--compile", action="store_true", help="run the training step's model under torch.compile")
    a.add_argument("--lean-head", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the LM head and loss in chunks of tokens, never the full logits (default: on)")
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


def exporting_a_checkpoint(args: argparse.Namespace) -> bool:
    """``--resume PATH --steps 0 --export DIR``: export that checkpoint, train nothing."""
    return bool(args.export) and args.steps == 0 and args.resume not in (None, "auto")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flags and fill the defaults that depend on others (``lr``, ``device``, ``precision``,
    ``out``, ``config_path``, ``hidden_size``); returns ``args``.

    Raises:
        RecipeError, among them for:
            - ``--model`` neither a name in recipes/configs nor a readable LlamaConfig JSON file;
            - ``--tokens`` and ``--steps`` both given, or a budget that is not a positive size;
            - ``--batch-size``, ``--seq-len``, ``--accumulation-steps``, ``--threads`` < 1; ``--lr`` <= 0;
              ``--warmup`` outside [0, 1); ``--min-lr-ratio`` outside [0, 1]; negative ``--eval-every``,
              ``--save-every``, ``--clip-norm``, ``--weight-decay``;
            - a method knob the method does not have (``--density`` with ``--method lost``) or an invalid value;
            - ``--per-layer`` with ``--parallel ddp|fsdp`` (the updates would race DDP's allreduce / FSDP's
              reduce-scatter); ``--state-bits 8|4`` with ``--parallel fsdp``; ``--method galore`` with fsdp,
              with ``--state-bits 8|4``, or without the ``galore-torch`` package;
            - ``--export`` with ``--method lost-silu`` (no dense form), onto a regular file or a folder
              holding other files than a previous export, or that is ``--out`` or holds it;
            - a new run (no ``--resume``) into an ``--out`` that holds another run's checkpoints or metrics;
            - ``--parallel ddp|fsdp`` outside torchrun, or a torchrun launch with ``--parallel none``;
            - ``--resume PATH`` that is not a checkpoint directory; ``--seed`` outside [0, 2**32);
            - a ``--model`` config that ties its embeddings; ``--sparse-backend semi-structured`` off CUDA.
    """
    args.config_path = str(find_config(args.model))
    if args.tokens is not None and args.steps is not None:
        raise RecipeError(f"give --tokens or --steps, not both (got --tokens {args.tokens} --steps {args.steps})")
    if args.tokens is not None and args.tokens < 1:
        raise RecipeError(f"--tokens must be positive; got {args.tokens}")
    if args.tokenizer and args.vocab_size is not None:
        raise RecipeError(f"--vocab-size {args.vocab_size} sizes a tokenizer trained on the data; with --tokenizer "
                          f"{args.tokenizer!r} the vocabulary is that tokenizer's: drop one of them")
    args.vocab_size = DEFAULT_VOCAB if args.vocab_size is None else args.vocab_size
    positive = ("batch_size", "seq_len", "accumulation_steps", "keep", "vocab_size", "valid_tokens")
    for name in positive + (("threads",) if args.threads is not None else ()) + (("eval_batches",) if args.eval_batches is not None else ()):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:  # numpy's and torch's seeds are unsigned 32-bit
        raise RecipeError(f"--seed must lie in [0, 2**32); got {args.seed}")
    if args.seq_len < 2:
        raise RecipeError(f"--seq-len must be >= 2 (the model predicts token t+1 from tokens <= t); got {args.seq_len}")
    _fill_training_defaults(args)
    for name in ("steps", "eval_every", "save_every", "clip_norm", "weight_decay"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 0; got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise RecipeError(f"--lr must be a positive number; got {args.lr}")
    if args.linear_init_std is not None and not (args.linear_init_std > 0 and math.isfinite(args.linear_init_std)):
        raise RecipeError(f"--linear-init-std must be a positive number (transformers' default is 0.02); got {args.linear_init_std}")
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
    _check_parallel_and_optimizer(args)
    if args.export and args.method in ("lost-silu", "cola") and not exporting_a_checkpoint(args):  # there, the checkpoint's method decides
        raise RecipeError(f"--export refused: --method {args.method} has no dense form (a nonlinearity sits between its "
                          f"factors: y = ...σ(x Aᵀ) Bᵀ is not x Wᵀ for any W); use --method lost (linear LOST merges "
                          f"exactly) or drop --export")
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
    if config.tie_word_embeddings:  # safetensors refuses the shared tensor at the first checkpoint
        raise RecipeError(f"--model {args.model!r} ties its input and output embeddings (tie_word_embeddings), which "
                          f"the recipe's checkpoints cannot store; use a config with \"tie_word_embeddings\": false")
    if args.sparse_backend == "semi-structured" and args.device != "cuda":
        raise RecipeError(f"--sparse-backend semi-structured needs a CUDA GPU (2:4 kernels); got --device {args.device}")
    args.hidden_size = config.hidden_size
    method_settings(args, size_of(config))  # a bad knob value fails here, before any data is read
    args.out = args.out or f"runs/{Path(args.model).stem}-{args.method}"
    if args.export:
        check_export_target(args.export, None if exporting_a_checkpoint(args) else args.out)
    if not exporting_a_checkpoint(args):
        check_fresh_out(args)
    return args


def _check_parallel_and_optimizer(args: argparse.Namespace) -> None:
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


GENERIC_TRAINING = {"weight_decay": 0.0, "clip_norm": 1.0, "warmup": 0.1, "min_lr_ratio": 0.1}


def _fill_training_defaults(args: argparse.Namespace) -> None:
    """--lr, --weight-decay, --clip-norm, --warmup, --min-lr-ratio left unset take the method's published
    settings at this size (lsparam.presets: CoLA's scripts set all of them), else the generic ones."""
    try:
        from transformers import LlamaConfig

        size = size_of(LlamaConfig.from_json_file(args.config_path))
    except Exception:  # noqa: BLE001  (a config find_config accepted but transformers cannot read: no size)
        size = None
    published = training_defaults(args.method, size)
    for name, generic in GENERIC_TRAINING.items():
        if getattr(args, name) is None:
            setattr(args, name, published.get(name, generic))
    if args.lr is None:
        args.lr = default_lr(args.method, size)


def method_settings(args: argparse.Namespace, size: str | None):
    """The lsparam config (or GaLore's settings dict) for --method at this size, with flag overrides;
    None for ``full``. ``args.hidden_size`` sizes GaLore's fractional rank."""
    from lsparam.presets import method_config

    overrides = {KNOBS[d][0]: getattr(args, d) for d in KNOBS if getattr(args, d) is not None}
    if args.method == "full":
        return None
    if args.method == "galore":  # GaLore's paper ranks equal SLTrain's; hidden/4 for the CPU sizes
        settings = {"rank": method_config("lowrank", size).rank, "scale": 0.25, "update_proj_gap": 200, "proj_type": "std",
                    **overrides}
        return _checked_galore(settings, args.hidden_size)
    try:
        return dataclasses.replace(method_config(args.method, size), **overrides)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"--method {args.method}: {error}") from None


def _checked_galore(settings: dict, hidden_size: int) -> dict:
    """GaLore's settings with a fractional rank made absolute; each refused outside what GaLore can use
    (its projector slices by the rank and multiplies its update by the scale, without checking either)."""
    rank = settings["rank"]
    if isinstance(rank, float):
        if not 0 < rank < 1:
            raise RecipeError(f"--rank {rank}: a fractional rank lies in (0, 1)")
        rank = settings["rank"] = max(1, int(rank * hidden_size))
    if not 1 <= rank <= hidden_size:
        raise RecipeError(f"--rank {rank} for --method galore must lie in [1, {hidden_size}] (the hidden size), or be a "
                          f"fraction in (0, 1)")
    if not (math.isfinite(settings["scale"]) and settings["scale"] > 0):
        raise RecipeError(f"--galore-scale must be a positive number (GaLore's default 0.25); got {settings['scale']}")
    if settings["update_proj_gap"] < 1:
        raise RecipeError(f"--update-proj-gap must be >= 1 (steps between projection updates); got {settings['update_proj_gap']}")
    return settings


# What an export writes (save_pretrained of the model and its tokenizer): a folder holding only such files
# is a previous export, which a new one replaces; any other file or folder in it is refused.
EXPORT_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "chat_template*")


def check_export_target(directory: str, out: str | None = None) -> None:
    """Refuse an ``--export`` that could not be written or would overwrite something other than an export,
    before any training: a regular file, a directory holding anything but a previous export's files, or one
    that is the run's ``--out`` or holds it (the export replaces its whole directory; one inside ``--out``,
    such as ``runs/x/hf``, is fine)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise RecipeError(f"--export {directory!r} is a file; name a directory (created if missing)")
    if out is not None:
        export_at, out_at = target.resolve(), Path(out).resolve()
        if export_at == out_at or export_at in out_at.parents:
            raise RecipeError(f"--export {directory!r} is --out {out!r} or holds it, and the export replaces its whole "
                              f"directory; name another export directory (e.g. {str(Path(out) / 'hf')!r})")
    if target.is_dir():
        foreign = [entry.name for entry in target.iterdir()
                   if not entry.is_file() or not any(fnmatch.fnmatch(entry.name, pattern) for pattern in EXPORT_FILES)]
        if foreign or (any(target.iterdir()) and not (target / "config.json").is_file()):
            raise RecipeError(f"--export {directory!r} holds other files than an exported model ({sorted(foreign)[:5]}), "
                              f"which replacing it would delete; name a new or empty directory, or a previous export")


def check_fresh_out(args: argparse.Namespace) -> None:
    """Refuse a new run (no ``--resume``) into an ``--out`` that holds another run's checkpoints or metrics:
    its checkpoints would be taken for this run's (kept, exported, pruned) and its metrics overwritten."""
    if args.resume is not None:
        return
    out = Path(args.out)
    held = sorted(path.name for path in (out / "checkpoints").glob("step_*"))
    metrics = out / "metrics.jsonl"
    if held or (metrics.is_file() and metrics.stat().st_size > 0):
        what = f"checkpoints {held[:3]}{' ...' if len(held) > 3 else ''}" if held else "metrics.jsonl"
        raise RecipeError(f"--out {args.out!r} already holds a run ({what}); continue it with --resume auto, "
                          f"delete it, or choose another --out")
