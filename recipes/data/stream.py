"""Packing with exact resume: this rank's documents, tokenized ahead in a thread, joined with EOS and cut
into ``[batch_size, seq_len]`` batches (:class:`TrainStream`), and the position of the next token
(:class:`_Position`) that a checkpoint saves.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .tokenizer import _groups

if TYPE_CHECKING:
    from .config import DataConfig
    from .sources import _DocumentSource

STATE_VERSION = 1


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
