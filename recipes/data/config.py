"""What to train on and how to cut it into batches: :class:`DataConfig`, checked by :meth:`DataConfig.validate`."""

from __future__ import annotations

from dataclasses import dataclass

C4_PATH, C4_NAME, C4_TOKENIZER = "allenai/c4", "en", "t5-base"
DATASETS = ("c4",)


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
