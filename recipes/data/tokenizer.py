"""Tokenizers: load one (a ``tokenizer.json``, a directory or a hub name), or train a byte-level BPE on a
sample of the training files and cache it under ``cache_dir/tokenizers``; encode documents in groups.

(The module is ``tokenizer``, singular: ``tokenizers`` is the Hugging Face package it trains with.)
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import TYPE_CHECKING

from .cache import _cached_directory, _digest
from .hub import _hub_error, _require_hub

if TYPE_CHECKING:
    from .config import DataConfig
    from .sources import _DocumentSource

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
TOKENIZE_GROUP_CHARS = 1 << 20  # tokenize documents in groups of about this many characters (parallel, in a thread)
TOKENIZE_GROUP_DOCS = 256
TOKENIZER_VERSION = 1


def _encoder(tokenizer):
    """A function from a list of texts to lists of token ids (no special tokens added)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(list(texts), add_special_tokens=False)]


def _groups(items):
    """Lists of consecutive ``(key, text, extra)`` items, of about TOKENIZE_GROUP_CHARS characters."""
    group, chars = [], 0
    for item in items:
        group.append(item)
        chars += len(item[1])
        if chars >= TOKENIZE_GROUP_CHARS or len(group) >= TOKENIZE_GROUP_DOCS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges and pipeline (not of its padding/truncation settings)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for setting in ("padding", "truncation"):
        spec.pop(setting, None)
    return _digest(spec)


def _load_tokenizer(name: str):
    """A ``PreTrainedTokenizerFast`` from a directory, a ``tokenizer.json`` file or (hub reachable) a hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = pathlib.Path(name).expanduser()
    if path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        vocab = tokenizer.get_vocab()
        if tokenizer.eos_token is None and EOS_TOKEN in vocab:
            tokenizer.eos_token = EOS_TOKEN
        if tokenizer.pad_token is None and PAD_TOKEN in vocab:
            tokenizer.pad_token = PAD_TOKEN
        return tokenizer, str(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path)), str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ValueError(f"tokenizer={name!r} is neither an existing file or directory nor a hub name")
    try:  # already in the Hugging Face cache: no network needed
        return AutoTokenizer.from_pretrained(name, local_files_only=True), name
    except Exception:
        pass
    _require_hub(f"tokenizer={name!r}")
    try:
        return AutoTokenizer.from_pretrained(name), name
    except Exception as error:
        raise _hub_error(f"tokenizer={name!r}", f"loading it failed with {type(error).__name__}: {error}") from error


def _trained_tokenizer(source: _DocumentSource, config: DataConfig, log):
    """A byte-level BPE trained on a sample of ``source``, cached under ``cache_dir/tokenizers``."""
    from transformers import PreTrainedTokenizerFast

    key = _digest({"files": source.cache_key, "vocab_size": config.vocab_size, "text_field": source.text_field,
                   "chars": config.tokenizer_train_chars, "version": TOKENIZER_VERSION})[:16]
    directory = pathlib.Path(config.cache_dir) / "tokenizers" / f"bpe{config.vocab_size}-{key}"

    def build(tmp: pathlib.Path) -> None:
        started = time.perf_counter()
        sample = _tokenizer_sample(source, config.tokenizer_train_chars)
        log(f"training a byte-level BPE tokenizer (vocab_size={config.vocab_size}) on {len(sample) / 1e6:.1f}M "
            f"characters of {len(source.shard_names)} file(s)...")
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(sample, config.vocab_size),
                                            eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        tokenizer.save_pretrained(str(tmp))
        log(f"tokenizer trained in {time.perf_counter() - started:.1f} s, saved to {directory}")

    _cached_directory(directory, build)
    return _load_tokenizer(str(directory))


def _tokenizer_sample(source: _DocumentSource, budget: int) -> str:
    """About ``budget`` characters, an equal share from each shard (its first documents), joined by newlines."""
    per_shard = max(1, budget // len(source.shard_names))
    pieces = []
    for shard in range(len(source.shard_names)):
        left = per_shard
        for _, text in source.documents(shard):
            pieces.append(text[:left])
            left -= len(pieces[-1])
            if left <= 0:
                break
    return "\n".join(pieces)


def _train_bpe(text: str, vocab_size: int):
    """A ``tokenizers.Tokenizer``: byte-level BPE with ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunk = 1 << 16
    tokenizer.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer)
    return tokenizer
