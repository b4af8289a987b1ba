"""recipes/bench/passages.py: the quality study's corpus as shuffled passages keeps every word, in order
within each passage, and every passage exactly once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes.bench import passages

ROOT = Path(__file__).resolve().parent.parent

words = st.text(alphabet="abcdefgh", min_size=1, max_size=12)
paragraphs = st.lists(words, min_size=1, max_size=30).map(" ".join)


def _paragraphs_of(texts):
    return [p for t in texts for p in t.split("\n\n")]


@settings(max_examples=200, deadline=None)
@given(st.lists(paragraphs, min_size=1, max_size=20), st.lists(st.sampled_from(["\n\n", "\n\n\n"]), min_size=20, max_size=20),
       st.integers(1, 200))
def test_split_passages_keeps_every_paragraph_in_order(paras, separators, passage_chars):
    text = "".join(p + s for p, s in zip(paras, separators))
    out = passages.split_passages(text, passage_chars)
    expected = []
    for p in paras:  # a paragraph over twice the size becomes space-separated pieces of at most the size
        expected += passages._cut_long(p, passage_chars) if len(p) > 2 * passage_chars else [p]
    assert _paragraphs_of(out) == expected
    assert "".join("".join(expected).split()) == "".join(text.split())  # no character lost or invented
    if all(len(w) <= passage_chars for w in text.split()):  # words are cut only when longer than a passage
        assert " ".join(expected).split() == text.split()
    for passage in out:  # a passage stops at the paragraph that brings it to the size, not later
        assert sum(map(len, passage.split("\n\n")[:-1])) < passage_chars
    if all(len(p) <= 2 * passage_chars for p in paras):  # and only the last one may stay short
        assert all(sum(map(len, passage.split("\n\n"))) >= passage_chars for passage in out[:-1])
    for p in paras:
        if len(p) > 2 * passage_chars:
            assert all(0 < len(piece) <= passage_chars for piece in passages._cut_long(p, passage_chars))


def test_split_passages_rejects_a_size_below_one():
    with pytest.raises(ValueError, match="passage_chars must be a positive int; got passage_chars=0"):
        passages.split_passages("text", 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(paragraphs, min_size=1, max_size=40), st.integers(1, 5), st.integers(5, 60))
def test_write_passages_writes_each_passage_once(tmp_path_factory, paras, shards, passage_chars):
    root = tmp_path_factory.mktemp("corpus")
    half = len(paras) // 2
    (root / "a.txt").write_text("\n\n".join(paras[:half]))
    (root / "b.txt").write_text("\n\n".join(paras[half:]) or "tail")
    pattern = passages.write_passages(str(root / "*.txt"), root / "mixed", shards=shards, passage_chars=passage_chars)
    files = sorted((root / "mixed").glob("*.jsonl"))
    written = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
    expected = [p for name in ("a.txt", "b.txt") for p in passages.split_passages((root / name).read_text(), passage_chars)]
    assert Counter(written) == Counter(expected)
    assert len(files) == min(shards, len(expected)) and pattern == str(root / "mixed" / "*.jsonl")
    sizes = [len(f.read_text().splitlines()) for f in files]
    assert max(sizes) - min(sizes) <= 1  # balanced shards


def test_write_passages_reuses_a_matching_build_and_rebuilds_on_change(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(50)))
    out = tmp_path / "mixed"
    passages.write_passages(str(tmp_path / "a.txt"), out, shards=3, passage_chars=100)
    first = {f.name: f.read_text() for f in out.iterdir()}
    (out / "passages_00.jsonl").write_text("stale\n")  # reused as is: the stamp matches
    passages.write_passages(str(tmp_path / "a.txt"), out, shards=3, passage_chars=100)
    assert (out / "passages_00.jsonl").read_text() == "stale\n"
    passages.write_passages(str(tmp_path / "a.txt"), out, shards=2, passage_chars=100)  # other arguments: rebuilt
    assert sorted(f.name for f in out.glob("*.jsonl")) == ["passages_00.jsonl", "passages_01.jsonl"]
    assert not (tmp_path / "mixed.tmp").exists()
    shuffled = [json.loads(l)["text"] for f in sorted(out.glob("*.jsonl")) for l in f.read_text().splitlines()]
    in_order = passages.split_passages((tmp_path / "a.txt").read_text(), 100)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order  # the fixed seed did shuffle
    assert len(first) == 4  # three shards and the stamp


def test_write_passages_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        passages.write_passages(str(tmp_path / "*.txt"), tmp_path / "out", shards=1)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="shards must be a positive int; got shards=0"):
        passages.write_passages(str(tmp_path / "a.txt"), tmp_path / "out", shards=0)
