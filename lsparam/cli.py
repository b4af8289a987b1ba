"""The ``lsparam`` command line. ``lsparam memory --help`` explains the memory table."""

from __future__ import annotations

import argparse
import json
import os
import sys

COLUMNS_HELP = """columns (GiB, 1 GiB = 2^30 bytes):
  method      full-rank, low-rank, SLTrain, LOST (linear), LOST-SiLU, CoLA, and CoLA-M (CoLA recomputing
              its rank-r activation in backward), with the papers' per-size settings
  states      optimizer-state precision: 32 = torch AdamW (states in the parameter dtype), 8/4 = torchao
  per-layer   'yes': updates inside backward, only one parameter's gradient alive at a time
  params(M)   parameter count, millions
  weights     parameters in --dtype
  grads       gradients alive at once (all of them, or the largest single one with per-layer updates)
  states      optimizer states (torchao keeps tensors under 4096 elements in full precision)
  indices     sparse index arrays in memory (SLTrain's support: uint16 columns and row pointers; LOST channel list)
  activations what autograd saves for backward, traced on fake tensors for --batch-size x --seq-len
  paper       weights + states + indices: the convention of the GaLore and SLTrain memory tables
  peak        modelled peak of one step: max(start of backward, optimizer step), see docs/memory.md
  the row matching --method/--state-bits/--per-layer is marked with '<'"""


def _table_methods() -> tuple[str, ...]:
    """The table's rows: every method, and the variants whose memory differs (CoLA-M's activations)."""
    from lsparam.presets import METHODS, VARIANTS

    return (*METHODS, *VARIANTS)


def _memory_command(args) -> int:
    from lsparam.memory import estimate
    from lsparam.presets import method_config

    config, size = _model_config(args.model)
    rows = []
    for method in _table_methods():
        for bits in (32, 8, 4) if args.state_bits == 4 else (32, 8):
            for per_layer in (False, True):
                breakdown = estimate(
                    config, method_config(method, size), state_bits=bits, per_layer=per_layer,
                    param_dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                    activation_checkpointing=args.activation_checkpointing, lean_head=args.lean_head,
                )
                chosen = method == args.method and bits == args.state_bits and per_layer == args.per_layer
                rows.append((method, bits, per_layer, breakdown, chosen))
    if args.json:
        print(json.dumps([
            {"method": m, "state_bits": b, "per_layer": p, "chosen": c, **d.as_dict()} for m, b, p, d, c in rows
        ], indent=1, default=str))
        return 0
    gib = 2**30
    header = f"{'method':<10} {'states':>6} {'per-layer':>9} {'params(M)':>9} {'weights':>8} {'grads':>8} {'states':>8} {'indices':>8} {'activations':>11} {'paper':>8} {'peak':>8}"
    print(f"lsparam memory: {args.model}, {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}"
          f"{', lean head' if args.lean_head else ''} (GiB)")
    print(header)
    for method, bits, per_layer, d, chosen in rows:
        print(f"{method:<10} {bits:>6} {'yes' if per_layer else 'no':>9} {d.parameter_count / 1e6:>9.1f} "
              f"{d.parameters / gib:>8.2f} {d.gradients / gib:>8.2f} {d.optimizer_states / gib:>8.2f} "
              f"{d.sparse_indices / gib:>8.2f} {d.activations / gib:>11.2f} {d.paper / gib:>8.2f} {d.total / gib:>8.2f}"
              f"{'  <' if chosen else ''}")
    return 0


def _model_config(model: str):
    """``(config, size name or None)`` for ``--model``: a LLaMA size, or the path of a config.json."""
    from lsparam.presets import LLAMA_SIZES, llama_config, size_of

    if model in LLAMA_SIZES:
        return llama_config(model), model
    if not model.endswith(".json"):
        raise CommandError(f"--model {model!r} is neither a size ({', '.join(LLAMA_SIZES)}) nor a path ending in .json")
    if not os.path.isfile(model):
        raise CommandError(f"--model {model!r}: no such file")
    from lsparam.extras import require

    AutoConfig = require("transformers", "hf", "lsparam memory --model CONFIG.json").AutoConfig
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:  # bad JSON, or no model_type transformers knows
        raise CommandError(f"--model {model!r} is not a transformers config.json: {error}") from None
    if config.model_type != "llama":
        raise CommandError(f"--model {model!r} is a {config.model_type!r} config; the memory table models LLaMA "
                           f"configs (model_type 'llama')")
    return config, size_of(config)  # a known size's shape takes that size's paper settings, as the recipe does


class CommandError(Exception):
    """A bad command-line value: printed as one ``lsparam: ...`` line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from lsparam.presets import LLAMA_SIZES

    parser = argparse.ArgumentParser(prog="lsparam", description="lsparam command line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser(
        "memory",
        help="predicted memory of one training step, across methods (no weights allocated)",
        description="Predict the memory of one training step for every method, with 32- and 8-bit optimizer "
        "states, with and without per-layer updates, like the papers' tables. Nothing is allocated: the "
        "model is built from fake tensors (shapes only).",
        epilog=COLUMNS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    memory.add_argument("--model", default="llama_7b",
                        help=f"a size ({', '.join(LLAMA_SIZES)}) or a transformers config.json path (default: llama_7b)")
    memory.add_argument("--method", default="sltrain", choices=_table_methods(), help="row to mark (default: sltrain)")
    memory.add_argument("--state-bits", type=int, default=32, choices=(32, 8, 4),
                        help="row to mark; 4 adds the 4-bit rows (default: 32)")
    memory.add_argument("--per-layer", action="store_true", help="row to mark: per-layer updates")
    memory.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="parameter dtype (default: bf16)")
    memory.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default: 1)")
    memory.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    memory.add_argument("--activation-checkpointing", action="store_true", help="keep only decoder-layer inputs")
    memory.add_argument("--lean-head", action="store_true",
                        help="the loss by lsparam.lean_head's chunked head (no full logits), as the recipes compute it")
    memory.add_argument("--json", action="store_true", help="print every breakdown as JSON (bytes)")
    memory.set_defaults(run=_memory_command)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``lsparam`` command.

    >>> main(["memory", "--model", "llama_60m", "--dtype", "fp32"])  # doctest: +ELLIPSIS
    lsparam memory: llama_60m, fp32, batch 1 x 256 tokens (GiB)
    method     states per-layer ...
    full           32        no      58.1 ...
    ...
    0
    """
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "seq_len"):
        if getattr(args, name, 1) < 1:
            print(f"lsparam: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        return args.run(args)
    except CommandError as error:
        print(f"lsparam: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
