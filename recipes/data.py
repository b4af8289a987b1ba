"""Token batches for LLaMA pretraining: C4 as in the papers, your own files, or an offline default.

One code path serves every source: ``datasets.load_dataset(..., streaming=True)`` gives a stream of
documents per shard (a shard is one file), the documents are tokenized, joined with the tokenizer's EOS
token and cut into contiguous ``seq_len`` sequences (no padding), ``batch_size`` of them per batch::

    doc 1 tokens, EOS, doc 2 tokens, EOS, doc 3 ...  ->  [seq_len] [seq_len] ...  ->  [batch_size, seq_len]

The three sources:

- ``DataConfig(dataset="c4")``: ``allenai/c4`` (``en``), streamed from the Hugging Face hub, with the T5
  tokenizer (``t5-base``), the setting of the SLTrain and LOST papers. Validation is C4's validation split.
  Without the hub it fails in seconds with :class:`HubUnreachableError`.
- ``DataConfig(data_files="corpus/train/*.txt", valid_files="corpus/valid/*.txt")``: local ``.txt`` (one
  document per file), ``.jsonl``/``.json`` (one document per record, field ``text``) or ``.parquet``
  (column ``text``), optionally compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``). Without ``valid_files``
  the first ``valid_tokens`` tokens of the corpus (files in sorted order) are held out for validation and
  never trained on. A byte-level BPE tokenizer is trained on the training files and cached, unless
  ``tokenizer`` names one.
- ``DataConfig()``: an offline default that downloads nothing: the English docstrings and comments of the
  Python standard library installed on this machine, written once into ``cache_dir`` as jsonl files
  (one document per module, every tenth module held out for validation), then read like ``data_files``.

Order and sharding. An epoch visits the shards (files) in an order shuffled with ``(seed, epoch)``, and
the documents of each shard through a shuffle buffer of ``shuffle_buffer`` documents seeded with
``(seed, epoch, shard)``; ``shuffle=False`` keeps the files' sorted order. When ``world_size`` divides the
number of shards (C4's 1024, the offline default's 8), the shard in position ``s`` goes to rank
``s % world_size`` and each rank reads only its own shards; otherwise document ``d`` of the shard in
position ``s`` goes to rank ``(s + d) % world_size`` (every rank reads every shard, but tokenizes only its
documents). Either way ranks see disjoint documents, and each rank packs its own documents into its own
token stream. The union of the ranks' batches at one step is therefore not
what one process with ``batch_size * world_size`` would see (sequences are cut from per-rank streams),
but every document of an epoch is seen exactly once, by exactly one rank. The stream is infinite: after
the last document of epoch ``e`` it goes on with epoch ``e + 1`` (a new order), mid-sequence.

Resuming. :meth:`TrainStream.state_dict` is the position of the next token: ``(epoch, shard, document,
token)`` (the position of the shard in the epoch's order, of the document in the shard's shuffled order,
and of the token in that document's tokens). :meth:`TrainStream.load_state_dict` skips the finished
shards without reading them, re-reads the current shard up to the document (no tokenization) and
re-tokenizes that one document, then yields exactly the batches an uninterrupted run would have.

Example (a tiny corpus of three text files; a tokenizer is trained and cached in ``cache_dir``)::

    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     _ = (tmp / f"doc{i}.txt").write_text(f"Document {i} says hello to the world. " * 50)
    >>> data = build_data(DataConfig(data_files=str(tmp / "*.txt"), vocab_size=300, seq_len=16,
    ...                              batch_size=2, valid_tokens=64, cache_dir=str(tmp / "cache")))
    >>> batch = next(data.train)
    >>> batch.shape, batch.dtype
    (torch.Size([2, 16]), torch.int64)
    >>> state = data.train.state_dict()             # plain ints and strings: json or torch.save it
    >>> [b.shape for b in data.valid_batches()]     # 64 held-out tokens: two batches of 2 x 16
    [torch.Size([2, 16]), torch.Size([2, 16])]
    >>> data.tokenizer.eos_token, data.vocab_size == len(data.tokenizer)
    ('<|endoftext|>', True)
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import sys
import sysconfig
import time
import tokenize
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

C4_PATH, C4_NAME, C4_TOKENIZER = "allenai/c4", "en", "t5-base"
DATASETS = ("c4",)
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
HUB_TIMEOUT_S = 5.0
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STATE_VERSION = 1
TOKENIZE_GROUP_CHARS = 1 << 20  # tokenize documents in groups of about this many characters (parallel, in a thread)
TOKENIZE_GROUP_DOCS = 256
OFFLINE_TRAIN_SHARDS = 8  # the offline default's train documents go round-robin into this many jsonl files
OFFLINE_VALID_EVERY = 10  # every tenth module of the offline default is a validation document
OFFLINE_VERSION = 1
TOKENIZER_VERSION = 1


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub cannot be reached (offline mode, no network, or the download failed)."""


# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class DataConfig:
    """What to train on and how to cut it into batches; :func:`build_data` turns it into :class:`Data`.

    >>> DataConfig(data_files="corpus/train/*.txt", valid_files="corpus/valid/*.txt").seq_len
    256
    >>> DataConfig(dataset="c4").validate()  # checks the values only; nothing is downloaded yet
    """

    dataset: str | None = None  # "c4" (allenai/c4 'en', streamed, T5 tokenizer) or None
    data_files: str | None = None  # local text/jsonl/parquet path, directory or glob (comma-separated allowed)
    tokenizer: str | None = None  # a tokenizer dir, tokenizer.json or hub name; None: "t5-base" for c4, else trained
    vocab_size: int = 8192  # for a tokenizer trained locally
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch, per rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cache_dir: str = "runs/cache"  # trained tokenizers and the offline corpus are cached here
    valid_tokens: int = 65536  # held-out tokens for evaluation (from valid files, or split off train); 0: none
    valid_files: str | None = None  # local validation files (same forms as data_files); None: split off train
    text_field: str = "text"  # the field (jsonl) or column (parquet) holding the text
    shuffle: bool = True  # shuffle shards and documents per epoch; False: sorted files, documents in file order
    shuffle_buffer: int = 1000  # documents in the per-shard shuffle buffer
    tokenizer_train_chars: int = 4_000_000  # characters of the training files sampled to train a tokenizer
    offline_max_files: int | None = None  # offline default only: read at most this many stdlib modules

    def validate(self) -> None:
        """Raise ``ValueError`` naming the argument, its value and what is valid; called by :func:`build_data`."""
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is not known; valid: {', '.join(map(repr, DATASETS))}, "
                             f"or None to read data_files (or the offline default when data_files is None too)")
        if self.dataset is not None and self.data_files is not None:
            raise ValueError(f"give either dataset or data_files, not both; got dataset={self.dataset!r} and "
                             f"data_files={self.data_files!r}")
        if self.valid_files is not None and self.data_files is None:
            raise ValueError(f"valid_files={self.valid_files!r} needs data_files (the training files) as well")
        for name in ("seq_len", "batch_size", "world_size", "shuffle_buffer", "tokenizer_train_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {name}={value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, world_size={self.world_size}); got rank={self.rank!r}")
        if isinstance(self.valid_tokens, bool) or not isinstance(self.valid_tokens, int) or self.valid_tokens < 0:
            raise ValueError(f"valid_tokens must be an int >= 0 (0: no validation); "
                             f"got valid_tokens={self.valid_tokens!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string; got text_field={self.text_field!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int; got seed={self.seed!r}")
        if self.offline_max_files is not None and (not isinstance(self.offline_max_files, int)
                                                   or self.offline_max_files < 1):
            raise ValueError(f"offline_max_files must be None or an int >= 1; got {self.offline_max_files!r}")
        if self.tokenizer is None and self.dataset is None and (
                isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 258):
            raise ValueError(f"vocab_size must be >= 258 for a byte-level BPE (256 bytes and 2 special tokens); "
                             f"got vocab_size={self.vocab_size!r}")


# ---------------------------------------------------------------------------------------------------------
# the public objects


class Data:
    """A tokenizer, an infinite stream of training batches and fixed validation batches.

    Attributes: ``tokenizer`` (a ``transformers.PreTrainedTokenizerFast``), ``vocab_size``
    (``len(tokenizer)``: every id in a batch is below it), ``eos_token_id`` (between packed documents),
    ``pad_token_id`` (never in a batch; for generation or padding elsewhere), ``train`` (a
    :class:`TrainStream` for this rank), ``tokenizer_path`` (the directory or name it was loaded from:
    ``tokenizer.save_pretrained`` it next to a checkpoint, or pass it as ``DataConfig.tokenizer``) and
    ``description`` (one line for the log).
    """

    def __init__(self, config: DataConfig, tokenizer, tokenizer_path: str, train: TrainStream,
                 valid_tokens: torch.Tensor, description: str):
        self.config = config
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.train = train
        self.description = description
        self._valid = _batches_of(valid_tokens, config.batch_size, config.seq_len)

    def valid_batches(self, max_batches: int | None = None) -> list[torch.Tensor]:
        """The validation batches, each ``[batch_size, seq_len]``, the same on every call and every rank.

        They are the first ``valid_tokens`` tokens of the validation documents (read in order, joined
        with EOS), cut into whole batches; a remainder smaller than one batch is dropped. ``max_batches``
        keeps the first ones (for a quick evaluation).
        """
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"max_batches must be None or >= 0; got max_batches={max_batches!r}")
        return list(self._valid if max_batches is None else self._valid[:max_batches])

    def __repr__(self) -> str:
        return f"Data({self.description})"


@dataclass(frozen=True)
class _Position:
    """Where the next token comes from: epoch, shard position, document position, token offset."""

    epoch: int = 0
    shard: int = 0
    document: int = 0
    token: int = 0

    def key(self) -> tuple[int, int, int]:
        return self.epoch, self.shard, self.document


class TrainStream:
    """An infinite iterator of ``LongTensor[batch_size, seq_len]`` for this rank, resumable exactly::

        batch = next(data.train)
        checkpoint = {"model": ..., "data": data.train.state_dict()}   # torch.save(checkpoint, path)
        ...
        data = build_data(config)                                      # a fresh process, the same config
        data.train.load_state_dict(torch.load(path, weights_only=True)["data"])
        next(data.train)                                               # the batch after `batch`
    """

    def __init__(self, documents: _DocumentSource, encode, eos_token_id: int, config: DataConfig,
                 fingerprint: str):
        self._documents = documents
        self._encode = encode
        self._eos = eos_token_id
        self._config = config
        self._fingerprint = fingerprint
        self._position = _Position()
        self._batches = 0
        self._iterator = None

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._pack(self._position)
        batch, self._position = next(self._iterator)
        self._batches += 1
        return batch

    def state_dict(self) -> dict:
        """The position in the stream, as plain ints and strings (``json`` and ``torch.load(weights_only=True)`` safe).

        ``epoch``, ``shard``, ``document``, ``token`` locate the next token; ``batches`` counts the
        batches yielded so far; ``seed``, ``rank``, ``world_size`` and ``data`` (a fingerprint of the
        files, held-out split, shuffling and tokenizer) are checked by :meth:`load_state_dict`.
        """
        return {"version": STATE_VERSION, **dataclasses.asdict(self._position), "batches": self._batches,
                "seed": self._config.seed, "rank": self._config.rank, "world_size": self._config.world_size,
                "data": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`): the next batches are those that followed it."""
        expected = {"version": STATE_VERSION, "seed": self._config.seed, "rank": self._config.rank,
                    "world_size": self._config.world_size, "data": self._fingerprint}
        missing = [k for k in (*expected, "epoch", "shard", "document", "token", "batches") if k not in state]
        if missing:
            raise ValueError(f"not a TrainStream state: missing {missing}; got keys {sorted(state)}")
        wrong = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if wrong:
            details = "; ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in wrong.items())
            raise ValueError(f"this TrainStream state belongs to other data or another rank layout ({details}); "
                             f"resume with the same data, tokenizer, seed, rank and world_size")
        self.close()
        self._position = _Position(*(int(state[k]) for k in ("epoch", "shard", "document", "token")))
        self._batches = int(state["batches"])

    def close(self) -> None:
        """Stop the background tokenization (the stream restarts from its position on the next ``next``)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def _pack(self, start: _Position) -> Iterator[tuple[torch.Tensor, _Position]]:
        """Batches, each with the position of the token after it."""
        need = self._config.batch_size * self._config.seq_len
        pending: collections.deque = collections.deque()  # [position key, offset of piece[0], piece]
        available = 0
        for key, offset, ids in self._tokenized(start):
            if offset >= len(ids):
                continue
            pending.append([key, offset, ids[offset:]])
            available += len(ids) - offset
            while available >= need:
                parts, taken = [], 0
                while taken < need:
                    entry = pending[0]
                    piece = entry[2][: need - taken]
                    parts.append(piece)
                    taken += len(piece)
                    if len(piece) == len(entry[2]):
                        pending.popleft()
                        last_key = entry[0]
                    else:
                        entry[1] += len(piece)
                        entry[2] = entry[2][len(piece):]
                available -= need
                if pending:
                    position = _Position(*pending[0][0], token=pending[0][1])
                else:
                    position = _Position(last_key[0], last_key[1], last_key[2] + 1, 0)
                yield torch.cat(parts).view(self._config.batch_size, self._config.seq_len), position

    def _tokenized(self, start: _Position):
        """``(key, offset, ids + [EOS])`` for this rank's documents from ``start``; tokenized ahead in a thread."""
        groups = _groups(self._documents.train_documents(start, self._config.rank, self._config.world_size))
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        ahead: collections.deque = collections.deque()
        try:
            for group in groups:
                ahead.append((group, pool.submit(self._encode, [text for _, text, _ in group])))
                if len(ahead) > 1:
                    yield from self._finish(*ahead.popleft())
            while ahead:
                yield from self._finish(*ahead.popleft())
        finally:  # no join: this may run in any thread, the garbage collector's choice
            pool.shutdown(wait=False, cancel_futures=True)

    def _finish(self, group, future):
        eos = torch.tensor([self._eos], dtype=torch.long)
        for (key, _, offset), ids in zip(group, future.result()):
            yield key, offset, torch.cat([torch.tensor(ids, dtype=torch.long), eos])


def build_data(config: DataConfig) -> Data:
    """The tokenizer, training stream and validation batches that ``config`` describes.

    Raises ``ValueError`` for a bad config or unusable files, and :class:`HubUnreachableError` (a
    ``RuntimeError``) within seconds when ``dataset="c4"`` or a hub tokenizer is asked for without a
    reachable Hugging Face hub.
    """
    config.validate()
    log = _logger(config.rank)
    if config.dataset == "c4":
        _require_hub(f"dataset={config.dataset!r} ({C4_PATH})")
        train_source = _DocumentSource.hub(C4_PATH, C4_NAME, "train", config)
        valid_source = _DocumentSource.hub(C4_PATH, C4_NAME, "validation", config)
        tokenizer, tokenizer_path = _load_tokenizer(config.tokenizer or C4_TOKENIZER)
    else:
        data_files, valid_files = config.data_files, config.valid_files
        if data_files is None:
            data_files, valid_files = _offline_corpus(config, log)
        train_files = _resolve_files("data_files", data_files)
        valid_list = _resolve_files("valid_files", valid_files) if valid_files is not None else None
        overlap = sorted(set(train_files) & set(valid_list or ()))
        if overlap:
            raise ValueError(f"data_files and valid_files share {len(overlap)} file(s), e.g. {overlap[0]!r}; "
                             f"train and validation must not overlap")
        train_source = _DocumentSource.local("data_files", train_files, config)
        valid_source = _DocumentSource.local("valid_files", valid_list, config) if valid_list else None
        if config.tokenizer is not None:
            tokenizer, tokenizer_path = _load_tokenizer(config.tokenizer)
        else:
            tokenizer, tokenizer_path = _trained_tokenizer(train_source, config, log)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer={tokenizer_path!r} has no EOS token; packing needs one between documents")
    encode = _encoder(tokenizer)

    started = time.perf_counter()
    if config.valid_tokens == 0:
        valid, valid_from = _HeadTokens(torch.zeros(0, dtype=torch.long), None), "none"
    elif valid_source is not None:
        valid = valid_source.head_tokens(config.valid_tokens, encode, tokenizer.eos_token_id)
        valid_from = "valid_files" if config.dataset is None else f"{C4_PATH} validation"
    else:  # hold out the head of the training corpus
        valid = train_source.head_tokens(config.valid_tokens, encode, tokenizer.eos_token_id)
        if valid.cut is None:
            raise ValueError(f"the training files hold only {len(valid.tokens)} tokens, no more than "
                             f"valid_tokens={config.valid_tokens}: nothing is left to train on; lower valid_tokens "
                             f"or give valid_files")
        train_source.holdout = valid.cut
        valid_from = "held out from data_files"
    if config.valid_tokens and len(valid.tokens) < config.batch_size * config.seq_len:
        raise ValueError(f"the validation data has only {len(valid.tokens)} tokens (valid_tokens="
                         f"{config.valid_tokens}), less than one batch of batch_size * seq_len = "
                         f"{config.batch_size} * {config.seq_len}; raise valid_tokens, give more validation text, "
                         f"or set valid_tokens=0 for no validation")
    if config.valid_tokens:
        log(f"validation: {len(valid.tokens):,} tokens ({valid_from}) in {time.perf_counter() - started:.1f} s")

    fingerprint = _digest({"source": train_source.identity, "holdout": train_source.holdout,
                           "shuffle": config.shuffle, "buffer": config.shuffle_buffer,
                           "tokenizer": _tokenizer_digest(tokenizer)})[:16]
    train = TrainStream(train_source, encode, tokenizer.eos_token_id, config, fingerprint)
    description = (f"{train_source.description}, tokenizer {tokenizer_path} ({len(tokenizer):,} tokens), "
                   f"validation {len(valid.tokens):,} tokens ({valid_from}), rank {config.rank}/{config.world_size}, "
                   f"{config.batch_size} x {config.seq_len} tokens per batch")
    return Data(config, tokenizer, tokenizer_path, train, valid.tokens, description)


# ---------------------------------------------------------------------------------------------------------
# documents: one datasets.load_dataset(..., streaming=True) per source, read shard by shard


@dataclass
class _HeadTokens:
    tokens: torch.Tensor  # the first n tokens of the source in canonical order
    cut: list | None  # [shard, document, token] of the next token, None when the source ran out first


class _DocumentSource:
    """The documents of one split: a streaming ``datasets.IterableDataset`` and its shard names."""

    def __init__(self, dataset, shard_names: list[str], text_field: str, config: DataConfig, *, argument: str,
                 identity, cache_key, description: str, remote: bool):
        self.dataset = dataset
        self.argument = argument  # how errors name this source: "data_files", "valid_files" or "dataset"
        self.shard_names = shard_names
        self.text_field = text_field
        self.config = config
        self.identity = identity  # names and sizes: what a resumed run must see again
        self.cache_key = cache_key  # paths, sizes and modification times: when to retrain a tokenizer
        self.description = description
        self.remote = remote
        self._shards: dict = {}  # shard index -> a one-shard IterableDataset
        self.holdout: list | None = None  # [shard, document, token]: everything before it is validation

    @classmethod
    def hub(cls, path: str, name: str, split: str, config: DataConfig) -> _DocumentSource:
        """A dataset on the hub, e.g. ``allenai/c4`` ``en``; hub failures become :class:`HubUnreachableError`."""
        dataset = _load_dataset(path, name=name, split=split, streaming=True)
        names = [f"shard {i} of {path} {name} {split}" for i in range(dataset.n_shards)]
        return cls(dataset, names, "text", config, argument="dataset", identity=[path, name, split],
                   cache_key=[path, name, split],
                   description=f"{path} ({name}, {split}, streamed)", remote=True)

    @classmethod
    def local(cls, argument: str, files: list[str], config: DataConfig) -> _DocumentSource:
        """Local files of one format: each file is one shard."""
        builder, kwargs = _builder_for(argument, files)
        dataset = _load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        if dataset.n_shards != len(files):  # datasets made other shards than one per file: not expected
            raise RuntimeError(f"datasets split {len(files)} files into {dataset.n_shards} shards; "
                               f"expected one per file")
        text_field = "text" if builder == "text" else config.text_field
        parent = os.path.commonpath([os.path.dirname(f) for f in files])
        source = cls(dataset, files, text_field, config, argument=argument,
                     identity=[builder, [(os.path.relpath(f, parent), os.path.getsize(f)) for f in files]],
                     cache_key=[builder, [(f, *_file_stamp(f)) for f in files]],
                     description=f"{len(files)} {builder} file(s) ({_size(files)})", remote=False)
        source.check_fields()
        return source

    def check_fields(self) -> None:
        """Fail early when a file's first record lacks the text field."""
        for index in range(len(self.shard_names)):
            for row, example in enumerate(self._examples(index)):
                self._text(example, index, row)
                break

    def _examples(self, index: int):
        shard = self._shards.get(index)
        if shard is None:
            shard = self._shards[index] = self.dataset.shard(num_shards=self.dataset.n_shards, index=index)
        try:
            yield from shard
        except Exception as error:  # a remote shard failing mid-stream (lost network): say so
            if self.remote:
                raise HubUnreachableError(f"reading {self.shard_names[index]} failed: {error}") from error
            raise

    def _text(self, example: dict, shard: int, row: int) -> str:
        text = example.get(self.text_field)
        if not isinstance(text, str):
            fields = ", ".join(k for k, v in example.items() if v is not None)
            raise ValueError(f"{self.argument}: record {row} of {self.shard_names[shard]} has no string field "
                             f"{self.text_field!r} (fields: {fields or 'none'}); a jsonl/parquet file needs a "
                             f"'text' field (or set text_field)")
        return text

    def documents(self, shard: int, first: int = 0) -> Iterator[tuple[int, str]]:
        """``(index in file, text)`` of one shard, from document ``first`` on."""
        for row, example in enumerate(self._examples(shard)):
            if row >= first:
                yield row, self._text(example, shard, row)

    def canonical(self) -> Iterator[tuple[int, int, str]]:
        """``(shard, index, text)`` of every document: shards in sorted order, documents in file order."""
        for shard in range(len(self.shard_names)):
            for row, text in self.documents(shard):
                yield shard, row, text

    def head_tokens(self, n: int, encode, eos: int) -> _HeadTokens:
        """The first ``n`` tokens in canonical order, and where the next token lies."""
        parts, have = [], 0
        for group in _groups((shard, text, row) for shard, row, text in self.canonical()):
            for (shard, _, row), ids in zip(group, encode([text for _, text, _ in group])):
                ids = list(ids) + [eos]
                if have + len(ids) > n:
                    parts.append(torch.tensor(ids[: n - have], dtype=torch.long))
                    return _HeadTokens(torch.cat(parts), [shard, row, n - have])
                parts.append(torch.tensor(ids, dtype=torch.long))
                have += len(ids)
        tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return _HeadTokens(tokens, None)

    def train_documents(self, start: _Position, rank: int, world_size: int):
        """``((epoch, shard position, document position), text, token offset)`` for one rank, from ``start``.

        Infinite: epoch after epoch. Shards before the held-out cut are never read; documents before it
        in its shard are dropped before shuffling, and the cut document starts at the cut token. When
        ``world_size`` divides the number of shards, whole shards go to ranks (each rank reads only its
        own); otherwise documents do, and every rank reads every shard (tokenizing only its documents).
        """
        config = self.config
        cut_shard, cut_doc, cut_token = self.holdout or (0, 0, 0)
        shards = list(range(cut_shard, len(self.shard_names)))
        by_shard = len(shards) % world_size == 0
        epoch = start.epoch
        while True:
            order = list(shards)
            if config.shuffle:
                random.Random(f"{config.seed}/{epoch}/shards").shuffle(order)
            first_shard = start.shard if epoch == start.epoch else 0
            yielded = 0
            for position in range(first_shard, len(order)):
                if by_shard and position % world_size != rank:
                    continue
                shard = order[position]
                docs = self.documents(shard, first=cut_doc if shard == cut_shard else 0)
                if config.shuffle:
                    docs = _shuffle_buffer(docs, random.Random(f"{config.seed}/{epoch}/{shard}"), config.shuffle_buffer)
                first_doc = start.document if (epoch, position) == (start.epoch, start.shard) else 0
                for index, (row, text) in enumerate(docs):
                    if index < first_doc or (not by_shard and (position + index) % world_size != rank):
                        continue
                    key = (epoch, position, index)
                    offset = cut_token if (shard, row) == (cut_shard, cut_doc) else 0
                    if key == start.key():
                        offset = max(offset, start.token)
                    yielded += 1
                    yield key, text, offset
            if yielded == 0 and first_shard == 0 and (epoch != start.epoch or start.document == 0):
                raise ValueError(f"rank {rank} of world_size={world_size} gets no training documents: the training "
                                 f"data ({len(order)} file(s) after the held-out split) has fewer documents than "
                                 f"ranks; give more documents (e.g. split the files, or jsonl with one document per "
                                 f"line) or use fewer ranks")
            epoch += 1


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


def _shuffle_buffer(items, rng: random.Random, size: int):
    """A seeded shuffle buffer: deterministic given ``rng``'s seed and the input order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def _batches_of(tokens: torch.Tensor, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Whole ``[batch_size, seq_len]`` batches of a token sequence; the remainder is dropped."""
    per_batch = batch_size * seq_len
    n = len(tokens) // per_batch
    return [tokens[i * per_batch:(i + 1) * per_batch].view(batch_size, seq_len).clone() for i in range(n)]


def _builder_for(argument: str, files: list[str]) -> tuple[str, dict]:
    """The ``datasets`` builder (and its options) for files of one format."""
    builders = {}
    for f in files:
        name = f.lower()
        for compression in COMPRESSIONS:
            if name.endswith(compression):
                name = name[: -len(compression)]
        builder = BUILDERS.get(os.path.splitext(name)[1])
        if builder is None:
            raise ValueError(f"{argument}: {f!r} is not a supported file; valid: "
                             f"{', '.join(sorted(BUILDERS))} (optionally {', '.join(COMPRESSIONS)})")
        builders.setdefault(builder, f)
    if len(builders) > 1:
        examples = ", ".join(f"{b}: {f!r}" for b, f in builders.items())
        raise ValueError(f"{argument} mixes file formats ({examples}); give files of one format")
    builder = next(iter(builders))
    return builder, ({"sample_by": "document"} if builder == "text" else {})


def _resolve_files(argument: str, spec: str) -> list[str]:
    """Sorted absolute paths of the files that ``spec`` names: paths, directories or globs, comma-separated.

    >>> _resolve_files("data_files", "/nonexistent/*.txt")
    Traceback (most recent call last):
    ValueError: data_files='/nonexistent/*.txt': '/nonexistent/*.txt' matches no file
    """
    files = set()
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        path = pathlib.Path(pattern).expanduser()
        if path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        else:
            matched = [pathlib.Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise ValueError(f"{argument}={spec!r}: {pattern!r} matches no file")
        files.update(str(p.resolve()) for p in matched)
    if not files:
        raise ValueError(f"{argument}={spec!r} names no file")
    return sorted(files)


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _size(files: list[str]) -> str:
    return f"{sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB"


def _digest(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# the hub: fail fast when it cannot be reached


def _hub_offline_flag() -> str | None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def _hub_error(what: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"{what} needs the Hugging Face hub, which is unreachable ({reason}). Train on local files instead "
        f"(--data-files 'corpus/train/*.txt', optionally --valid-files) or on the offline default (no "
        f"--dataset and no --data-files: the Python standard library's docstrings)")


def _require_hub(what: str) -> None:
    """Raise :class:`HubUnreachableError` in at most ~5 s unless the hub answers a HEAD request."""
    flag = _hub_offline_flag()
    if flag is not None:
        raise _hub_error(what, f"{flag} is set")
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered, even if with an error status
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, a bad endpoint
        raise _hub_error(what, f"no answer from {endpoint} within {HUB_TIMEOUT_S:g} s: {error}") from error


def _load_dataset(path: str, **kwargs):
    """``datasets.load_dataset``; for a hub dataset, any failure becomes :class:`HubUnreachableError`."""
    import datasets

    if path in ("text", "json", "parquet"):
        return datasets.load_dataset(path, **kwargs)
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as error:
        raise _hub_error(f"dataset {path!r}", f"loading it failed with {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------------------
# tokenizers


def _encoder(tokenizer):
    """A function from a list of texts to lists of token ids (no special tokens added)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(list(texts), add_special_tokens=False)]


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


def _cached_directory(directory: pathlib.Path, build) -> bool:
    """Make ``directory`` with ``build(tmp)`` unless it exists; safe when ranks race. True if it was built."""
    if directory.is_dir():
        return False
    from filelock import FileLock

    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if directory.is_dir():
            return False
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------------------------------
# the offline default: docstrings and comments of the Python standard library


def _offline_corpus(config: DataConfig, log) -> tuple[str, str]:
    """``(data_files, valid_files)`` globs of the offline corpus, written into ``cache_dir`` on first use."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)[: config.offline_max_files]
    key = _digest({"root": str(root), "version": sys.version, "files": len(files), "format": OFFLINE_VERSION})[:12]
    directory = pathlib.Path(config.cache_dir) / f"stdlib-docs-py{sys.version_info[0]}{sys.version_info[1]}-{key}"

    def build(tmp: pathlib.Path) -> None:
        started = time.perf_counter()
        documents = []
        for path in _progress(files, "offline corpus: stdlib docstrings", config.rank):
            text = module_text(path)
            if text:
                documents.append((str(path.relative_to(root)), text))
        train, valid = [[] for _ in range(OFFLINE_TRAIN_SHARDS)], []
        for i, (module, text) in enumerate(documents):
            record = json.dumps({"text": text, "module": module}) + "\n"
            if i % OFFLINE_VALID_EVERY == OFFLINE_VALID_EVERY - 1:
                valid.append(record)
            else:  # round-robin over the train files
                train[(i - i // OFFLINE_VALID_EVERY) % OFFLINE_TRAIN_SHARDS].append(record)
        for k, records in enumerate(train):
            (tmp / f"train-{k:02d}.jsonl").write_text("".join(records), encoding="utf-8")
        (tmp / "valid.jsonl").write_text("".join(valid), encoding="utf-8")
        size = sum(len(t) for _, t in documents)
        log(f"offline corpus: {len(documents)} modules, {size / 1e6:.1f}M characters of docstrings and comments "
            f"from {root}, in {time.perf_counter() - started:.1f} s -> {directory}")

    _cached_directory(directory, build)
    return str(directory / "train-*.jsonl"), str(directory / "valid.jsonl")


def _stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The standard library's own modules, sorted (no tests, site-packages, data tables or IDLE)."""
    skip = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "pydoc_data", "encodings",
            "turtledemo", "ensurepip", "venv"}
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in skip and not d.startswith("test")]
        files += [pathlib.Path(directory, n) for n in names if n.endswith(".py") and not n.startswith("test")]
    return sorted(files)


_COMMENT_NOISE = re.compile(r"^(!|-\*-|(type:|noqa|pragma|fmt:|pylint:|XXX|TODO))|coding[:=]")


def module_text(path: pathlib.Path) -> str:
    """The docstrings and comment blocks of one Python file, in source order, as paragraphs.

    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.py"
    >>> _ = f.write_text("'''A module.'''\\n# Two words here.\\ndef g():\\n    '''Say hi.'''\\n")
    >>> print(module_text(f))
    A module.
    <BLANKLINE>
    Two words here.
    <BLANKLINE>
    Say hi.
    """
    try:
        with tokenize.open(path) as handle:
            source = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts = _docstrings(tree) + _comment_blocks(source)
    return "\n\n".join(text for _, text in sorted(parts, key=lambda part: part[0]))


def _docstrings(node) -> list[tuple[int, str]]:
    """``(line, docstring)`` of a module, class or function and everything defined inside it."""
    found = []
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and node.body:
            found.append((node.body[0].lineno, doc))
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, ()) or ():
            if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
                if hasattr(child, "body"):
                    found.extend(_docstrings(child))
    return found


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of runs of whole-line ``#`` comments that contain at least two words."""
    blocks, current, first = [], [], 0
    for number, line in enumerate(source.splitlines() + [""], start=1):
        stripped = line.strip()
        if stripped.startswith("#") and not _COMMENT_NOISE.search(stripped[1:].strip()):
            if not current:
                first = number
            current.append(stripped.lstrip("#").strip())
            continue
        text = " ".join(w for w in current if w).strip()
        if len(re.findall(r"[A-Za-z]{2,}", text)) >= 2:
            blocks.append((first, text))
        current = []
    return blocks


# ---------------------------------------------------------------------------------------------------------
# logging


def _logger(rank: int):
    """A one-line logger to stderr (rank 0 only)."""

    def log(message: str) -> None:
        if rank == 0:
            print(f"[data] {message}", file=sys.stderr, flush=True)

    return log


def _progress(items, description: str, rank: int):
    """A tqdm bar on stderr (rank 0 only)."""
    if rank != 0:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="file", file=sys.stderr, leave=False)


if __name__ == "__main__":  # a quick look: python recipes/data.py [data_files [valid_files]]
    args = sys.argv[1:]
    data = build_data(DataConfig(data_files=args[0] if args else None, valid_files=args[1] if len(args) > 1 else None))
    print(data.description)
    print(repr(data.tokenizer.decode(next(data.train)[0][:64].tolist())))
    print(data.train.state_dict())
