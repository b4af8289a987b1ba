"""Train a tiny LLaMA with low-rank plus sparse weights, on text already on this machine.

Builds a 4-layer, d=128 ``LlamaForCausalLM`` with byte-level tokens (no tokenizer, nothing to download),
turns its linear layers into LOST, SLTrain or low-rank weights with ``lsparam.parametrize``, and trains it
for about a minute on CPU. The default corpus is the Python standard library's own source (docstrings,
comments and code: English-ish text that every Python install has); ``--data-files`` takes your own.

    python examples/quickstart.py                     # LOST, ~1 minute on 2 CPU cores
    python examples/quickstart.py --method sltrain
    python examples/quickstart.py --method full --data-files 'notes/**/*.txt'
"""

import argparse
import glob
import logging
import math
import pathlib
import sysconfig
import time
import warnings

import torch
from tqdm import tqdm

# Quiet the environment's notices: torchao's optional kernels (transformers imports torchao when it is
# installed) and PyTorch's beta warning for the CSR tensors of SLTrain's sparse path.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

from transformers import LlamaConfig, LlamaForCausalLM

import lsparam

METHODS = {  # what each --method makes of every linear layer in the decoder blocks
    "lost": lambda: lsparam.LOSTConfig(rank=0.25, channel_ratio=0.05, gamma=0.5),
    "sltrain": lambda: lsparam.SLTrainConfig(rank=0.25, density=0.03, alpha=32.0),
    "lowrank": lambda: lsparam.LowRankConfig(rank=0.25),
    "full": lambda: None,  # plain dense training, for comparison
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS), default="lost",
                   help="weight structure of the linear layers (default: %(default)s)")
    p.add_argument("--steps", type=int, default=250,
                   help="optimizer steps (default: %(default)s: about a minute of LOST on a 2-core CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, 10%% warmup then cosine to 10%%; default 3e-3, or 1e-3 for --method full")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init and of the batches (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop training after this many seconds, wherever the schedule is (default: no limit)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: %(default)s; more can help on an idle machine, but on a busy "
                        "one they can make every step many times slower)")
    p.add_argument("--data-files", default=None,
                   help="text files to train on (a path or a glob); default: the Python standard library's .py files")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.lr is None:
        args.lr = 1e-3 if args.method == "full" else 3e-3  # full rank prefers a ~3x lower lr
    if args.lr <= 0:
        p.error(f"--lr must be > 0; got {args.lr}")
    return args


def load_corpus(pattern, seq_len):
    """(train, validation) byte tensors: the last 10% of every file (in sorted order) is held out."""
    if pattern is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3"}
        files = sorted(p for p in root.rglob("*.py") if not any(
            part in skip or part.startswith("test") for part in p.relative_to(root).parts))
    else:
        files = sorted(pathlib.Path(f) for f in glob.glob(pattern, recursive=True) if pathlib.Path(f).is_file())
    if not files:
        raise SystemExit(f"no text files found for --data-files {pattern!r}")
    texts = [f.read_bytes() for f in files]
    train = b"".join(t[: len(t) * 9 // 10] for t in texts)
    val = b"".join(t[len(t) * 9 // 10 :] for t in texts)
    if len(val) <= seq_len + 1:
        raise SystemExit(f"corpus too small for --seq-len {seq_len}: {len(train)} train, {len(val)} validation bytes")
    print(f"corpus: {len(files)} files, {len(train) / 1e6:.1f} MB train, {len(val) / 1e6:.1f} MB validation")
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return as_tensor(train), as_tensor(val)


def batch(data, batch_size, seq_len, generator):
    """Random windows of seq_len + 1 bytes; the model shifts the labels itself."""
    starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, val, batch_size, seq_len, batches=8):
    """Mean loss on the same held-out windows every time (a fixed generator)."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        x = batch(val, batch_size, seq_len, generator)
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val = load_corpus(args.data_files, args.seq_len)

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config)
    method = METHODS[args.method]()
    if method is not None:
        lsparam.parametrize(model, method)  # every nn.Linear in the decoder blocks; lm_head stays dense
        print(lsparam.summary(model))
    print(f"method {args.method}: {sum(p.numel() for p in model.parameters()):,} trainable parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    cosine = lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, args.steps - warmup))))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else cosine(s))

    start_loss = evaluate(model, val, args.batch_size, args.seq_len)
    print(f"validation loss at start: {start_loss:.3f} (perplexity {math.exp(start_loss):.1f} per byte)")

    generator = torch.Generator().manual_seed(args.seed)
    started, tokens = time.perf_counter(), 0
    progress = tqdm(range(args.steps), desc=f"train {args.method}")
    for step in progress:
        x = batch(train, args.batch_size, args.seq_len, generator)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        tokens += args.batch_size * args.seq_len
        elapsed = time.perf_counter() - started
        lr = schedule.get_last_lr()[0]
        progress.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / elapsed:,.0f}", lr=f"{lr:.1e}")
        if args.max_seconds is not None and elapsed > args.max_seconds:
            progress.close()
            print(f"stopping after {step + 1} steps: --max-seconds {args.max_seconds:g} reached")
            break
    progress.close()
    print(f"trained on {tokens:,} tokens in {time.perf_counter() - started:.0f} s")

    end_loss = evaluate(model, val, args.batch_size, args.seq_len)
    print(f"validation loss at end:   {end_loss:.3f} (perplexity {math.exp(end_loss):.1f} per byte)")
    if method is not None:
        lsparam.merge(model)  # plain dense nn.Linear layers again, e.g. for model.save_pretrained(...)
        merged_loss = evaluate(model, val, args.batch_size, args.seq_len)
        print(f"merged into a plain dense LlamaForCausalLM: validation loss {merged_loss:.3f}")


if __name__ == "__main__":
    main()
