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

The package, one job per module: ``config`` (:class:`DataConfig`), ``sources`` (documents, shuffling, rank
sharding, the held-out head, which files a spec names), ``stream`` (packing, the resume position),
``tokenizer`` (loading, training and caching tokenizers; encoding in groups), ``corpus`` (the offline
default), ``hub`` (failing fast without the hub) and ``cache`` (digests, directories built once); this
module ties them together in :func:`build_data`.

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

import sys
import time

import torch

# Monkeypatch a name where it is looked up: in its own module (e.g. recipes.data.tokenizer.TOKENIZE_GROUP_DOCS),
# or here for a name build_data calls (_require_hub, _load_tokenizer, ...).
from .cache import _digest
from .config import C4_NAME, C4_PATH, C4_TOKENIZER, DataConfig
from .corpus import _offline_corpus, module_text  # noqa: F401  (module_text: for callers of recipes.data)
from .hub import HubUnreachableError, _require_hub  # noqa: F401  (HubUnreachableError: raised through build_data)
from .sources import _DocumentSource, _HeadTokens, _resolve_files
from .stream import TrainStream, _Position  # noqa: F401  (_Position: the stream's resume state, for tests)
from .tokenizer import _encoder, _load_tokenizer, _tokenizer_digest, _trained_tokenizer


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
        for argument, source, spec in (("data_files", train_source, data_files), ("valid_files", valid_source, valid_files)):
            if source is not None and not source.has_text():  # a tokenizer trained on nothing, EOS-only batches
                raise ValueError(f"{argument}={spec!r}: its {len(source.shard_names)} file(s) hold no text (empty "
                                 f"or whitespace only); give files with text in them")
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


def _batches_of(tokens: torch.Tensor, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Whole ``[batch_size, seq_len]`` batches of a token sequence; the remainder is dropped."""
    per_batch = batch_size * seq_len
    n = len(tokens) // per_batch
    return [tokens[i * per_batch:(i + 1) * per_batch].view(batch_size, seq_len).clone() for i in range(n)]


def _logger(rank: int):
    """A one-line logger to stderr (rank 0 only)."""

    def log(message: str) -> None:
        if rank == 0:
            print(f"[data] {message}", file=sys.stderr, flush=True)

    return log
