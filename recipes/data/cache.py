"""Built once, reused after: content digests (cache keys, the stream's data fingerprint) and cache
directories that racing ranks build safely (trained tokenizers, the offline corpus)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil


def _digest(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
