"""Documents: one ``datasets.load_dataset(..., streaming=True)`` per source, read shard by shard (a local
shard is one file), in an order shuffled per epoch and dealt to the ranks; the held-out head of the
training files; and the files that ``data_files`` and ``valid_files`` name.
"""

from __future__ import annotations

import glob
import os
import pathlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .hub import HubUnreachableError, _load_dataset
from .tokenizer import _groups

if TYPE_CHECKING:
    from .config import DataConfig
    from .stream import _Position

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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

    def has_text(self) -> bool:
        """Whether any document holds more than whitespace (reads up to the first that does)."""
        return any(text.strip() for _, _, text in self.canonical())

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
