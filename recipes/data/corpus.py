"""The offline default: the docstrings and comments of the Python standard library installed on this
machine, written once into ``cache_dir`` as jsonl files (one document per module, every tenth module held
out for validation). Nothing is downloaded.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import sys
import sysconfig
import time
import tokenize
import warnings
from typing import TYPE_CHECKING

from .cache import _cached_directory, _digest

if TYPE_CHECKING:
    from .config import DataConfig

OFFLINE_TRAIN_SHARDS = 8  # the offline default's train documents go round-robin into this many jsonl files
OFFLINE_VALID_EVERY = 10  # every tenth module of the offline default is a validation document
OFFLINE_VERSION = 1


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


def _progress(items, description: str, rank: int):
    """A tqdm bar on stderr (rank 0 only)."""
    if rank != 0:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="file", file=sys.stderr, leave=False)
